"""A full disk under the response cache (a real 2 MB tmpfs filled to ENOSPC) is told apart
from damage: the cache is intact, so `ask` answers uncached with one warning, `serve` starts
and says `degraded` on /health, and writes resume once there is space again."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest
from conftest import run_mlxc
from full_disk import small_disk
from live_server import start_server, stop_server

from mlxc.store import DiskStore, StoreDamaged, StoreUnavailable
from mlxc.store_guard import GuardedStore


def disk(folder) -> DiskStore:
    return DiskStore(folder, 1 << 30, "least-recently-used", None)


def test_a_full_disk_is_unavailable_not_damaged(tmp_path):
    with small_disk(tmp_path / "responses") as small:
        store = disk(small.folder)
        store.set("kept", {"text": "written before the disk filled"})
        small.fill()
        for call in (lambda: store.set("new", {"text": "x" * 100}), lambda: disk(small.folder)):
            with pytest.raises(StoreUnavailable, match="is full") as caught:
                call()
            assert not isinstance(caught.value, StoreDamaged)
            assert "cache clear" not in str(caught.value) and "intact" in str(caught.value)
            assert caught.value.reason == "the response cache's disk is full"
            assert caught.value.reads_work
        # a read writes nothing (its count waits in memory): the intact answer is still read
        assert store.get("kept") == {"text": "written before the disk filled"}
        small.free()
        store.set("new", {"text": "after"})
        assert store.get("kept") == {"text": "written before the disk filled"}
        assert store.get("new") == {"text": "after"}
        store.close()


def test_the_guard_degrades_once_backs_off_and_resumes(tmp_path, caplog):
    now = [0.0]
    with small_disk(tmp_path / "responses") as small:
        guard = GuardedStore(lambda: disk(small.folder), clock=lambda: now[0])
        guard.set("a", {"text": "a"})
        small.fill()
        with caplog.at_level(logging.WARNING, logger="mlxc.store"):
            assert guard.get("a") == {"text": "a"}  # a read needs no space
            assert guard.degraded is None
            guard.set("b", {"text": "b"})  # the failure: degraded, retried after 1 s
            assert guard.degraded.reason == "the response cache's disk is full"
            assert guard.get("a") == {"text": "a"}  # still read, and no proof of recovery
            assert guard.degraded is not None and guard.degraded.failures == 1
            guard.set("b", {"text": "b"})  # skipped: not due
            now[0] = 1.5
            guard.set("b", {"text": "b"})  # due: fails again, next try 2 s later
            assert guard.degraded.retry_at == 3.5 and guard.degraded.failures == 2
            with pytest.raises(StoreUnavailable, match="is full"):
                guard.stats()
            small.free()
            guard.set("c", {"text": "c"})  # not due yet: dropped
            now[0] = 4.0
            guard.set("c", {"text": "c"})
            assert guard.degraded is None
        assert guard.get("c") == {"text": "c"} and guard.get("a") == {"text": "a"}
        warnings = [r.getMessage() for r in caplog.records]
        assert len([w for w in warnings if "warning" in w]) == 1, warnings
        assert any("works again" in w for w in warnings), warnings
        guard.close()


def test_ask_answers_on_a_full_cache_disk_and_resumes(mlxc_env, tmp_path):
    args = ("--max-tokens", "4", "--json")
    with small_disk(tmp_path / "cache" / "responses") as small:
        assert run_mlxc("ask", "Kept?", *args, env=mlxc_env).returncode == 0
        small.fill()
        asked = run_mlxc("ask", "Asked on a full disk?", *args, env=mlxc_env)
        assert asked.returncode == 0, asked.stderr
        warnings = [line for line in asked.stderr.splitlines() if line.startswith("mlxc:")]
        assert len(warnings) == 1 and "is full" in warnings[0], asked.stderr
        assert "damaged" not in asked.stderr and "Traceback" not in asked.stderr
        assert '"cached": false' in asked.stdout
        stats = run_mlxc("cache", "stats", env=mlxc_env)
        assert stats.returncode == 1 and "is full" in stats.stderr
        assert "damaged" not in stats.stderr
        small.free()
        assert run_mlxc("ask", "Asked again?", *args, env=mlxc_env).returncode == 0
        again = run_mlxc("ask", "Asked again?", *args, env=mlxc_env)
        assert '"cached": true' in again.stdout, again.stdout + again.stderr
        kept = run_mlxc("ask", "Kept?", *args, env=mlxc_env)
        assert '"cached": true' in kept.stdout  # the cache was intact all along


def test_cache_clear_works_on_a_full_disk(mlxc_env, tmp_path):
    """SQLite needs space to delete rows: clearing removes the files instead, which frees it."""
    with small_disk(tmp_path / "cache" / "responses") as small:
        disk(small.folder).set("k", {"text": "x"})
        small.fill()
        cleared = run_mlxc("cache", "clear", "-y", "--responses-only", env=mlxc_env)
        assert cleared.returncode == 0, cleared.stderr
        assert "full disk" in cleared.stdout and "damaged" not in cleared.stdout
        small.free()
        assert disk(small.folder).stats().cached_items == 0


def chat(client: openai.OpenAI, question: str) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny-llama", messages=[{"role": "user", "content": question}], max_tokens=4)
    return raw.headers["x-mlxc-cache"], raw.parse().choices[0].message.content


def test_serve_starts_degraded_on_a_full_cache_disk_and_resumes(tmp_path, tiny_model):
    with small_disk(tmp_path / "cache" / "responses") as small:
        small.fill()
        running = start_server(tmp_path, tiny_model)
        try:
            health = httpx.get(f"{running.url}/health", timeout=10).json()
            assert health["status"] == "degraded", health
            assert health["reason"] == "the response cache's disk is full"
            assert "is full" in health["cache"]["error"]
            client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0)
            status, text = chat(client, "Served on a full disk?")
            assert status == "bypass" and isinstance(text, str)
            small.free()
            assert repeated_until_hit(client, "Served once space is back?")[-1] == "hit"
            assert httpx.get(f"{running.url}/health", timeout=10).json()["status"] == "healthy"
        finally:
            stop_server(running)
        assert "damaged" not in running.log.read_text()


def repeated_until_hit(client: openai.OpenAI, question: str, seconds: float = 30) -> list[str]:
    """X-Mlxc-Cache of `question` asked again and again until a hit: the store is tried again
    after its backoff, and the first answer it takes is the next repeat's hit."""
    import time

    deadline = time.monotonic() + seconds
    statuses = [chat(client, question)[0]]
    while statuses[-1] != "hit" and time.monotonic() < deadline:
        time.sleep(0.3)
        statuses.append(chat(client, question)[0])
    assert set(statuses[:-1]) <= {"bypass", "miss"}, statuses
    return statuses


def test_ask_answers_when_the_whole_cache_folder_is_full(mlxc_env, tmp_path):
    with small_disk(tmp_path / "cache") as small:
        assert run_mlxc("ask", "Kept?", "--max-tokens", "4", env=mlxc_env).returncode == 0
        states = {p.name for p in (small.folder / "prefix").rglob("*") if p.is_file()}
        small.fill()
        asked = run_mlxc("ask", "Asked on a full folder?", "--max-tokens", "4", env=mlxc_env)
        assert asked.returncode == 0, asked.stderr
        assert "damaged" not in asked.stderr and "rebuilding" not in asked.stderr
        assert {p.name for p in (small.folder / "prefix").rglob("*") if p.is_file()} >= states

"""`mlxc serve` stopped with a real SIGTERM (what systemd, docker and kill send), as a real
process on the tiny model: it stops accepting, lets the requests in flight finish within
`--shutdown-timeout` (MLXC_SHUTDOWN_TIMEOUT) and cancels the rest, writes the prefix blocks
still queued for the disk writer and the counters, and exits 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
from conftest import run_mlxc
from live_server import Running, start_server, stop_server

MODEL = "tiny-llama"
# ~700 tokens: two whole 256-token prefix blocks and a part (the tiny model takes 1024).
SYSTEM = " ".join(
    f"Rule {i}: the quick brown fox jumps over the lazy dog number {i}." for i in range(25)
)


def client(running: Running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0, timeout=60)


def stats(running: Running) -> dict:
    done = run_mlxc("cache", "stats", "--json", env=running.env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def terminate(running: Running, within: float) -> tuple[int, float]:
    """SIGTERM; (exit status, seconds to exit)."""
    started = time.monotonic()
    running.proc.send_signal(signal.SIGTERM)
    status = running.proc.wait(timeout=within)
    return status, time.monotonic() - started


def log_text(running: Running) -> str:
    return " ".join(running.log.read_text().split())  # Rich wraps lines at the console width


def test_sigterm_writes_the_prefix_blocks_and_counters_and_exits_0(tmp_path, tiny_model):
    running = start_server(tmp_path, tiny_model, "--shutdown-timeout", "5")
    try:
        answer = client(running).chat.completions.create(
            model=MODEL,
            max_tokens=4,
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "hi"}],
        )
        # at once: the writer thread may still hold blocks, the counters are not yet saved
        status, _ = terminate(running, within=60)
    finally:
        stop_server(running, check=False)
    assert status == 0, log_text(running)
    prefix = stats(running)["prefix"]
    files = list((tmp_path / "cache" / "prefix").rglob("*.kvb"))
    assert prefix["disk_blocks"] >= 2 and len(files) == prefix["disk_blocks"], prefix
    assert prefix["tokens_prefilled"] == answer.usage.prompt_tokens, prefix
    # saved at the end: the bytes the writer wrote are the bytes on disk
    assert prefix["bytes_written"] == prefix["disk_bytes"] - prefix["index_bytes"] > 0, prefix
    text = log_text(running)
    assert "stopping: no new connections" in text and "Traceback" not in text, text


def test_sigterm_finishes_what_fits_in_the_grace_period_and_cancels_the_rest(tmp_path, tiny_model):
    grace = 4.0
    running = start_server(tmp_path, tiny_model, env={"MLXC_SHUTDOWN_TIMEOUT": f"{grace:g}"})
    oai = client(running)
    try:
        stream = oai.chat.completions.create(  # far longer than the grace period
            model=MODEL,
            max_tokens=5000,
            stream=True,
            messages=[{"role": "user", "content": "a very long one"}],
            extra_headers={"Cache-Control": "no-store"},
        )
        chunks = iter(stream)
        next(chunks)
        plain: dict = {}

        def ask() -> None:  # short: done well within the grace period
            try:
                plain["answer"] = oai.chat.completions.create(
                    model=MODEL,
                    max_tokens=300,
                    messages=[{"role": "user", "content": "a short one"}],
                )
            except Exception as exc:  # reported by the assertion below
                plain["answer"] = exc

        asker = threading.Thread(target=ask)
        asker.start()
        deadline = time.monotonic() + 30
        while httpx.get(f"{running.url}/health", timeout=5).json()["batch"]["running"] < 2:
            assert time.monotonic() < deadline and asker.is_alive(), plain
            time.sleep(0.01)
        started = time.monotonic()
        running.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        refused = None
        try:  # no new connections while the stream still runs
            httpx.get(f"{running.url}/health", timeout=2)
        except httpx.ConnectError as exc:
            refused = exc
        assert refused is not None and running.proc.poll() is None
        cut = False
        try:
            finish = [c.choices[0].finish_reason for c in chunks if c.choices]
        except openai.APIError:
            cut = True
        else:
            cut = finish[-1:] != ["length"]
        status = running.proc.wait(timeout=60)
        seconds = time.monotonic() - started
        asker.join(timeout=30)
    finally:
        stop_server(running, check=False)
    assert status == 0, log_text(running)
    assert cut, "the stream outlived the grace period"
    assert grace - 0.5 < seconds < grace + 15, seconds
    answer = plain["answer"]
    assert not isinstance(answer, Exception), answer
    assert answer.choices[0].finish_reason == "length" and answer.usage.completion_tokens == 300
    assert stats(running)["cached_items"] == 1  # the finished answer was stored
    text = log_text(running)
    assert "cancelled: the server is stopping" in text and "Traceback" not in text, text


def test_the_shutdown_timeout_is_checked(tmp_path: Path, mlxc_env):
    done = run_mlxc("serve", "--shutdown-timeout", "-1", env=mlxc_env, timeout=120)
    assert done.returncode == 1 and "--shutdown-timeout" in done.stderr, done.stderr

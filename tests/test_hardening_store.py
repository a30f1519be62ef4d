"""A damaged or tampered cache folder: planted rows are misses (never code), a damaged
database says how to fix it and `mlxc cache clear` removes it, folders and files stay
private whatever the umask."""

from __future__ import annotations

import logging
import os
import pickle
import shutil
import sqlite3
import stat
import time
from pathlib import Path

import pytest
from conftest import run_mlxc
from test_redis_store import redis_url  # noqa: F401  (the fixture)

from mlxc.config import Settings
from mlxc.store import DiskStore, RedisStore, StoreDamaged, open_store


def disk(tmp_path) -> DiskStore:
    return DiskStore(tmp_path / "responses", 1 << 30, "least-recently-used", None)


class Planted:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(store: DiskStore, key: str, **columns) -> None:
    """Rewrite the row of `key` (written by mlxc) the way another tool could."""
    store.set(key, {"text": "honest"})
    db = sqlite3.connect(store.directory / "cache.db")
    sets = ", ".join(f"{name} = ?" for name in columns)
    db.execute(f"UPDATE Cache SET {sets}", tuple(columns.values()))
    db.commit()
    db.close()


def test_a_planted_pickle_row_is_a_logged_miss_and_is_dropped(tmp_path, caplog):
    marker = tmp_path / "code-ran"
    store = disk(tmp_path)
    plant(store, "k", mode=4, value=pickle.dumps(Planted(str(marker))))
    with caplog.at_level(logging.WARNING, logger="mlxc.store"):
        assert store.get("k") is None
        assert store.get("k") is None  # the row is gone: a plain miss now
    assert not marker.exists()
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.refused_rows, stats.cached_items) == (0, 2, 1, 0)
    assert len([r for r in caplog.records if "mode 4" in r.getMessage()]) == 1
    store.set("k", {"text": "fresh"})
    assert store.get("k") == {"text": "fresh"}


@pytest.mark.parametrize("columns", [
    {"mode": 3, "filename": "../../victim.txt", "value": None},   # text file outside
    {"mode": 2, "filename": "../../victim.txt", "value": None},   # binary file outside
    {"mode": 1, "value": 42},                                      # a raw number
    {"mode": 1, "value": b"not zlib"},                             # bytes that are not ours
    {"mode": 1, "value": __import__("zlib").compress(b"[1, 2]")},  # JSON, not an object
    {"mode": 1, "value": __import__("zlib").compress(b"[" * 100000)},  # deep JSON
])
def test_foreign_rows_are_misses_and_touch_no_file_outside(tmp_path, columns):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    store = disk(tmp_path)
    plant(store, "k", **columns)
    assert store.get("k") is None
    store.clear()  # eviction and clearing remove a row's file: never one outside
    assert victim.read_text() == "keep me"
    assert store.stats().refused_rows == 1


def test_a_fifo_as_value_file_does_not_block(tmp_path):
    store = disk(tmp_path)
    store.set("big", {"text": os.urandom(100_000).hex()})  # large enough for a value file
    name = sqlite3.connect(store.directory / "cache.db").execute(
        "SELECT filename FROM Cache").fetchone()[0]
    path = store.directory / name
    path.unlink()
    os.mkfifo(path)
    started = time.monotonic()
    assert store.get("big") is None
    assert time.monotonic() - started < 5


def test_value_files_and_folders_are_private_whatever_the_umask(tmp_path):
    old = os.umask(0)
    try:
        (tmp_path / "cache" / "prefix").mkdir(parents=True, mode=0o777)
        settings = Settings(cache_dir=tmp_path / "cache")
        store = open_store(settings)
        store.set("big", {"text": os.urandom(100_000).hex()})
        store.set("small", {"text": "y"})
        store.close()
    finally:
        os.umask(old)
    for folder in (settings.cache_dir, settings.response_dir, settings.prefix_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    files = [p for p in settings.response_dir.rglob("*") if p.is_file()]
    assert any(p.suffix == ".val" for p in files)
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, path


def test_damaged_database_names_the_fix_and_clear_removes_it(tmp_path, mlxc_env):
    responses = tmp_path / "cache" / "responses"
    responses.mkdir(parents=True)
    (responses / "cache.db").write_bytes(b"this is not SQLite" * 100)
    with pytest.raises(StoreDamaged, match="mlxc cache clear"):
        open_store(Settings(cache_dir=tmp_path / "cache"))
    stats = run_mlxc("cache", "stats", env=mlxc_env, timeout=60)
    assert stats.returncode == 1 and "damaged" in stats.stderr
    assert "mlxc cache clear" in stats.stderr
    assert "Traceback" not in stats.stderr
    cleared = run_mlxc("cache", "clear", "--yes", env=mlxc_env, timeout=60)
    assert cleared.returncode == 0, cleared.stderr
    assert "removed the damaged response cache" in cleared.stdout
    assert run_mlxc("cache", "stats", "--json", env=mlxc_env, timeout=60).returncode == 0


def test_a_fifo_as_database_is_an_error_not_a_hang(tmp_path):
    responses = tmp_path / "responses"
    responses.mkdir()
    os.mkfifo(responses / "cache.db")
    with pytest.raises(StoreDamaged, match="not a regular file"):
        disk(tmp_path)
    DiskStore.destroy(responses)
    assert disk(tmp_path).stats().cached_items == 0


def test_truncated_database_is_damaged_not_a_traceback(tmp_path):
    store = disk(tmp_path)
    for i in range(200):
        store.set(f"k{i}", {"text": "x" * 500})
    store.close()
    db = tmp_path / "responses" / "cache.db"
    data = db.read_bytes()
    db.write_bytes(data[:4096] + b"\0" * 1000 + data[8192:])  # a torn page
    try:
        store = disk(tmp_path)
        for i in range(200):
            store.get(f"k{i}")
        store.close()
    except StoreDamaged as exc:
        assert "mlxc cache clear" in str(exc)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_a_non_json_redis_value_is_a_miss(redis_url):  # noqa: F811
    import redis

    store = RedisStore(redis_url, ttl=None)
    client = redis.Redis.from_url(redis_url)
    for raw in (b"\x80\x04not json", pickle.dumps(Planted("/nonexistent/x")), b"[1, 2]"):
        client.set(RedisStore.PREFIX + "bad", raw)
        assert store.get("bad") is None
        assert not client.exists(RedisStore.PREFIX + "bad")
    client.hset(RedisStore.STATS, "hits", "garbage")
    assert store.stats().refused_rows == 3
    store.clear()
    store.close()


def test_clear_removes_stored_responses_even_a_damaged_store(mlxc_env):
    """`previous_response_id` turns are cached answers too: `cache clear` removes them, and a
    store SQLite cannot read does not stop it."""
    from mlxc.server.conversations import Conversations

    folder = Path(mlxc_env["MLXC_CACHE_DIR"]) / "conversations"
    stored = Conversations(folder)
    stored.set("resp_1", {"body": {"id": "resp_1"}})
    stored.close()
    result = run_mlxc("cache", "clear", "-y", "--responses-only", env=mlxc_env)
    assert result.returncode == 0, result.stderr
    assert "removed 1 stored responses" in result.stdout
    assert Conversations(folder).get("resp_1") is None
    (folder / "cache.db").write_bytes(b"not a database" * 100)
    result = run_mlxc("cache", "clear", "-y", "--responses-only", env=mlxc_env)
    assert result.returncode == 0, result.stderr
    assert not (folder / "cache.db").exists()

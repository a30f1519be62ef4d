"""The disk store: JSON values, persistent shared stats, safe under concurrency and kills."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from mlxc.config import Settings
from mlxc.store import DiskStore, StoreError, open_store


def disk(tmp_path, **kw) -> DiskStore:
    options = {"size_limit": 1 << 30, "eviction_policy": "least-recently-used", "ttl": None}
    return DiskStore(tmp_path / "responses", **{**options, **kw})


def test_values_round_trip_as_json_and_never_pickle(tmp_path):
    store = disk(tmp_path)
    value = {"text": "Paris ✓", "usage": {"prompt_tokens": 3}}
    store.set("k", value)
    assert store.get("k") == value
    store.close()
    # diskcache's JSONDisk marks rows with MODE_TEXT/RAW/BINARY; pickle is mode 4.
    import sqlite3

    db = sqlite3.connect(tmp_path / "responses" / "cache.db")
    modes = {row[0] for row in db.execute("SELECT mode FROM Cache")}
    assert 4 not in modes


def test_folder_is_owner_only(tmp_path):
    disk(tmp_path).close()
    mode = stat.S_IMODE(os.stat(tmp_path / "responses").st_mode)
    assert mode == 0o700


def test_stats_survive_reopening_and_are_shared(tmp_path):
    store = disk(tmp_path)
    store.set("a", {"text": "x"})
    store.get("a")
    store.get("missing")
    store.close()
    again = disk(tmp_path)
    s = again.stats()
    assert (s.hits, s.misses, s.total_requests, s.cached_items) == (1, 1, 2, 1)
    assert s.hit_rate == 0.5 and s.size_bytes > 0
    assert again.contains("a") and again.stats().hits == 1  # contains() counts nothing
    assert again.clear() == 1
    assert again.stats().cached_items == 0 and again.stats().hits == 0


def test_ttl_expires_entries(tmp_path):
    store = disk(tmp_path, ttl=0.2)
    store.set("k", {"text": "x"})
    assert store.get("k") is not None
    time.sleep(0.4)
    assert store.get("k") is None


def test_size_limit_evicts(tmp_path):
    store = disk(tmp_path, size_limit=200_000)
    blob = os.urandom(60_000).hex()  # incompressible enough
    for i in range(10):
        store.set(f"k{i}", {"text": blob})
    store._cache.cull()
    assert store.stats().size_bytes <= 200_000 + 130_000
    assert store.stats().cached_items < 10


def test_unwritable_folder_is_a_clear_error(tmp_path):
    if os.geteuid() == 0:
        target = "/proc/mlxc-cannot-write-here"
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = str(locked / "cache")
    with pytest.raises(StoreError, match="--cache-dir"):
        DiskStore(target, 1 << 20, "least-recently-used", None)


WRITER = """
import sys
from mlxc.store import DiskStore
store = DiskStore(sys.argv[1], 1 << 30, "least-recently-used", None)
for i in range(int(sys.argv[3])):
    store.set(f"{sys.argv[2]}-{i}", {"text": "x" * 2000, "i": i})
    store.get(f"{sys.argv[2]}-{i}")
"""


def test_concurrent_writers_leave_a_consistent_cache(tmp_path):
    folder = str(tmp_path / "responses")
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, folder, name, "200"])
        for name in ("a", "b", "c")
    ]
    assert [p.wait(120) for p in procs] == [0, 0, 0]
    store = DiskStore(folder, 1 << 30, "least-recently-used", None)
    assert store.stats().cached_items == 600
    assert store.stats().hits == 600
    assert store.get("b-199") == {"text": "x" * 2000, "i": 199}
    assert store._cache.check() == []


def test_killed_writer_leaves_the_cache_readable(tmp_path):
    folder = str(tmp_path / "responses")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, folder, "k", "1000000"])
    time.sleep(2.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = DiskStore(folder, 1 << 30, "least-recently-used", None)
    n = store.stats().cached_items
    assert n > 0
    assert store.get("k-0") == {"text": "x" * 2000, "i": 0}
    store.set("after", {"text": "ok"})
    assert store.get("after") == {"text": "ok"}


def test_open_store_uses_the_settings_folder(tmp_path):
    store = open_store(Settings(cache_dir=tmp_path))
    assert store.stats().directory == str(tmp_path / "responses")

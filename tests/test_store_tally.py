"""The disk store's batched counts and touches (mlxc.store_tally): a read writes nothing, yet
the figures stay exact in this process, reach other processes within FLUSH_SECONDS, survive
a kill -9 once that long has passed, and evictions follow the policy as diskcache's own
per-read writes would have them."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import diskcache
import pytest
from conftest import run_mlxc
from test_redis_store import redis_url  # noqa: F401  (the fixture)

from mlxc.jsondisk import SafeJSONDisk
from mlxc.store import DiskStore, RedisStore
from mlxc.store_tally import FLUSH_SECONDS


def disk(folder, policy="least-recently-used", size_limit=1 << 30) -> DiskStore:
    return DiskStore(folder, size_limit, policy, None)


def test_a_read_writes_nothing_until_the_flush_and_the_figures_stay_exact(tmp_path):
    folder = tmp_path / "responses"
    store = disk(folder)
    store.set("a", {"text": "x"})
    store.flush()
    watcher = sqlite3.connect(folder / "cache.db")
    before = watcher.execute("PRAGMA data_version").fetchone()[0]
    for _ in range(50):
        assert store.get("a") == {"text": "x"}
    assert store.get("absent") is None
    assert store.get("absent", count_miss=False) is None  # the server's hit threads' read
    assert watcher.execute("PRAGMA data_version").fetchone()[0] == before  # no commit
    s = store.stats()
    assert (s.hits, s.misses) == (50, 1)  # disk + this process's unwritten counts
    other = disk(folder)  # another process would see the disk only
    assert (other.stats().hits, other.stats().misses) == (0, 0)
    deadline = time.monotonic() + FLUSH_SECONDS + 5
    while other.stats().hits != 50 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (other.stats().hits, other.stats().misses) == (50, 1)  # within the lag
    assert watcher.execute("PRAGMA data_version").fetchone()[0] != before
    assert store.stats().hits == 50  # not counted twice once written
    assert store.clear() == 1 and (store.stats().hits, store.stats().misses) == (0, 0)
    assert store.get("a") is None  # cleared: never served
    other.close()
    store.close()


HITTER = """
import sys, time
from mlxc.store import DiskStore
store = DiskStore(sys.argv[1], 1 << 30, "least-recently-used", None)
for _ in range(int(sys.argv[2])):
    assert store.get("a") is not None
print("done", flush=True)
time.sleep(600)
"""


def test_a_kill_9_loses_no_count_older_than_the_lag_and_no_entry(tmp_path):
    folder = tmp_path / "responses"
    store = disk(folder)
    store.set("a", {"text": "x"})
    store.close()
    proc = subprocess.Popen([sys.executable, "-c", HITTER, str(folder), "300"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "done"
        time.sleep(FLUSH_SECONDS + 1.0)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    again = disk(folder)
    assert again.stats().hits == 300
    assert again.get("a") == {"text": "x"} and again.stats().cached_items == 1
    again.close()


def test_a_process_that_exits_without_closing_saves_its_counts(tmp_path, mlxc_env):
    folder = tmp_path / "cache" / "responses"
    store = disk(folder)
    store.set("a", {"text": "x"})
    store.close()
    script = HITTER.replace('print("done", flush=True)\ntime.sleep(600)\n', "")
    subprocess.run([sys.executable, "-c", script, str(folder), "7"], check=True, timeout=120)
    shown = run_mlxc("cache", "stats", "--json", env=mlxc_env, timeout=120)
    assert shown.returncode == 0, shown.stderr
    figures = json.loads(shown.stdout)
    figures = figures.get("responses", figures)
    assert (figures["hits"], figures["misses"]) == (7, 0), figures


def test_threads_reading_while_another_writes_count_every_read(tmp_path):
    store = disk(tmp_path / "responses")
    store.set("a", {"text": "x"})
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set():
            store.set(f"w{i}", {"text": "y" * 500})
            i += 1

    def reader() -> None:
        for _ in range(300):
            assert store.get("a") == {"text": "x"}

    background = threading.Thread(target=writer)
    background.start()
    readers = [threading.Thread(target=reader) for _ in range(4)]
    for thread in readers:
        thread.start()
    for thread in readers:
        thread.join()
    stop.set()
    background.join()
    assert store.stats().hits == 1200
    store.close()
    assert disk(tmp_path / "responses").stats().hits == 1200


def survivors(cache_get, cache_set, keys_present) -> set[str]:
    """Fill past the limit, read some of the first entries, fill more: which are left."""
    blob = os.urandom(20_000).hex()  # ~24 kB a row once compressed
    for i in range(12):
        cache_set(f"old{i}", {"text": blob + str(i)})
        time.sleep(0.002)
    for i in (3, 7, 7, 9, 9, 9, 1):  # recency and frequency both differ from store order
        assert cache_get(f"old{i}") is not None
        time.sleep(0.002)
    for i in range(6):
        cache_set(f"new{i}", {"text": blob + "n" + str(i)})
        time.sleep(0.002)
    return keys_present()


@pytest.mark.parametrize("policy", ["least-recently-used", "least-frequently-used"])
def test_evictions_follow_the_policy_as_diskcaches_own_reads_would(tmp_path, policy):
    limit = 360_000  # 12 entries fit, 14 do not: diskcache then culls 10 by the policy
    ours = disk(tmp_path / "ours", policy, size_limit=limit)
    kept = survivors(ours.get, ours.set, lambda: set(ours._cache.iterkeys()))
    # diskcache itself, writing the access time or count on every read
    reference = diskcache.Cache(str(tmp_path / "theirs"), disk=SafeJSONDisk,
                                disk_compress_level=6, size_limit=limit,
                                eviction_policy=policy, statistics=True)
    expected = survivors(reference.get, reference.set, lambda: set(reference.iterkeys()))
    reference.close()
    assert len(expected) < 18  # something was evicted
    assert kept == expected
    assert "old9" in kept  # read most, and among the last read
    ours.close()


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")
def test_redis_counts_a_hit_only_when_asked_to(redis_url):  # noqa: F811
    store = RedisStore(redis_url, ttl=None)
    store.clear()
    store.set("k", {"text": "x"})
    assert store.get("absent", count_miss=False) is None
    assert store.get("k", count_miss=False) == {"text": "x"}
    assert store.get("absent") is None
    s = store.stats()
    assert (s.hits, s.misses) == (1, 1)
    store.clear()
    store.close()

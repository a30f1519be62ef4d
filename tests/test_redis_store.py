"""The Redis store against a real redis-server on loopback: namespaced keys, shared stats,
TTL, and a clear that never touches anything outside `mlxc:`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from mlxc.config import Settings
from mlxc.store import RedisStore, StoreError, open_store

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def redis_url():
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(10)


def test_values_stats_and_namespaced_clear(redis_url):
    import redis

    raw = redis.Redis.from_url(redis_url)
    raw.set("someone-else", "keep me")
    first = open_store(Settings(redis_url=redis_url))
    second = RedisStore(redis_url, ttl=None)  # another server sharing the cache
    first.set("k", {"text": "Paris ✓"})
    assert second.get("k") == {"text": "Paris ✓"}
    assert first.get("missing") is None
    assert second.contains("k") and not second.contains("missing")
    stats = first.stats()
    assert (stats.hits, stats.misses, stats.cached_items) == (1, 1, 1)
    assert stats.backend == "redis" and stats.size_bytes > 0
    assert raw.get("mlxc:resp:k") is not None  # keys live under the mlxc: namespace
    assert second.clear() == 1
    assert first.stats().cached_items == 0 and first.stats().hits == 0
    assert raw.get("someone-else") == b"keep me"


def test_ttl_expires(redis_url):
    store = RedisStore(redis_url, ttl=0.3)
    store.set("short", {"text": "x"})
    assert store.contains("short")
    time.sleep(0.6)
    assert not store.contains("short")


def test_unreachable_redis_is_a_clear_error():
    with pytest.raises(StoreError, match="cannot reach Redis"):
        RedisStore(f"redis://127.0.0.1:{free_port()}/0", ttl=None)


def test_ask_shares_answers_through_redis(redis_url, mlxc_env, tmp_path):
    import json

    from conftest import run_mlxc

    env = {**mlxc_env, "MLXC_REDIS_URL": redis_url}
    args = ("ask", "Shared through Redis?", "--max-tokens", "6", "--json")
    first = json.loads(run_mlxc(*args, env=env).stdout)
    # Another "machine": a different local cache folder, the same Redis.
    other = {**env, "MLXC_CACHE_DIR": str(tmp_path / "elsewhere")}
    second = json.loads(run_mlxc(*args, env=other).stdout)
    assert not first["cached"] and second["cached"] and second["text"] == first["text"]

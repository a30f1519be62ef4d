"""The Redis response store, for several servers sharing one cache (mlxc.store has the
disk one and what both share). Imports redis only when one is opened."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlxc.store import StoreStats, StoreUnavailable

log = logging.getLogger("mlxc.store")


class RedisStore:
    """Redis, for several servers sharing one cache. Keys live under `mlxc:`; clearing deletes
    only those, never the whole database. Size and eviction follow the server's maxmemory.
    Any Redis failure (gone, timed out, out of memory) is StoreUnavailable: it passes."""

    PREFIX = "mlxc:resp:"
    STATS = "mlxc:stats"

    def __init__(self, url: str, ttl: float | None):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.ttl = ttl
        self.refused = 0
        self._gone, self._errors = (redis.ConnectionError, redis.TimeoutError), redis.RedisError
        with self._reach():
            # One quick retry (a connection dropped by a restart); mlxc.store_guard backs off
            # between attempts, so a Redis that is gone costs a request milliseconds, not
            # redis-py's default ten retries. A timeout: a hung Redis must not hang answers.
            self._redis = redis.Redis.from_url(
                url, socket_connect_timeout=2, socket_timeout=5, retry=Retry(NoBackoff(), 1)
            )
            self._redis.ping()

    @contextmanager
    def _reach(self) -> Iterator[None]:
        try:
            yield
        except self._gone as exc:
            raise StoreUnavailable(f"cannot reach Redis at {self.url}: {str(exc).rstrip('.')}. "
                                   "Is redis-server running?", reason="Redis is unreachable"
                                   ) from exc
        except self._errors as exc:  # out of memory, read-only replica, ...
            reason = f"Redis refused a command ({type(exc).__name__})"
            raise StoreUnavailable(f"Redis at {self.url} refused a command: {exc}",
                                   reason=reason) from exc

    def get(self, key: str, count_miss: bool = True) -> dict[str, Any] | None:
        with self._reach():
            raw = self._redis.get(self.PREFIX + key)
            value = None
            if raw is not None:
                try:
                    value = json.loads(raw)
                except (ValueError, RecursionError):
                    value = None
                if not isinstance(value, dict):  # not what mlxc writes: a miss, and dropped
                    self._redis.delete(self.PREFIX + key)
                    self.refused += 1
                    if self.refused == 1:
                        log.warning("mlxc: ignored and removed a non-JSON value under %s%s in "
                                    "Redis", self.PREFIX, key)
                    value = None
            if value is not None or count_miss:
                self._redis.hincrby(self.STATS, "hits" if value is not None else "misses", 1)
        return value

    def contains(self, key: str) -> bool:
        with self._reach():
            return bool(self._redis.exists(self.PREFIX + key))

    def set(self, key: str, value: dict[str, Any]) -> None:
        ttl_ms = int(self.ttl * 1000) if self.ttl else None
        with self._reach():
            self._redis.set(self.PREFIX + key, json.dumps(value, ensure_ascii=False), px=ttl_ms)

    def _keys(self) -> list[bytes]:
        return list(self._redis.scan_iter(match=self.PREFIX + "*", count=1000))

    def stats(self) -> StoreStats:
        with self._reach():
            counts = self._redis.hgetall(self.STATS)
            keys = self._keys()
            pipe = self._redis.pipeline()
            for k in keys:
                pipe.strlen(k)
            policy = self._redis.config_get("maxmemory-policy").get("maxmemory-policy", "")
            limit = int(self._redis.config_get("maxmemory").get("maxmemory", 0))
            size = sum(pipe.execute()) if keys else 0

        def count(name: bytes) -> int:
            value = counts.get(name, b"0")
            return int(value) if value.isdigit() else 0

        return StoreStats(
            hits=count(b"hits"),
            misses=count(b"misses"),
            cached_items=len(keys),
            size_bytes=size,
            directory=self.url,
            backend="redis",
            eviction_policy=str(policy),
            size_limit=limit,
            refused_rows=self.refused,
        )

    def clear(self) -> int:
        with self._reach():
            keys = self._keys()
            for i in range(0, len(keys), 500):
                self._redis.delete(*keys[i : i + 500])
            self._redis.delete(self.STATS)
        return len(keys)

    def close(self) -> None:
        self._redis.close()

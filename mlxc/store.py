"""Response store: request key -> finished answer, on disk (diskcache) or in Redis.

Values are JSON, never pickle: anyone who can write the cache folder must not be able to run
code in mlxc. Hit/miss counters live in the store itself, so they survive restarts and are
shared by every process that opens it. Imports nothing heavy: this is the cache-hit path.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from mlxc.config import Settings


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says where and what to do."""


@dataclass
class StoreStats:
    hits: int
    misses: int
    cached_items: int
    size_bytes: int
    directory: str
    backend: str
    eviction_policy: str
    size_limit: int

    @property
    def total_requests(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        return self.hits / self.total_requests if self.total_requests else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_requests": self.total_requests, "hit_rate": self.hit_rate}


class ResponseStore(Protocol):
    """What every backend offers. `get` counts a hit or a miss; `contains` counts nothing."""

    def get(self, key: str) -> dict[str, Any] | None: ...
    def contains(self, key: str) -> bool: ...
    def set(self, key: str, value: dict[str, Any]) -> None: ...
    def stats(self) -> StoreStats: ...
    def clear(self) -> int: ...
    def close(self) -> None: ...


class DiskStore:
    """diskcache on local disk. Thread-safe and process-safe; each write is one atomic
    SQLite transaction, so a killed process leaves the cache readable."""

    def __init__(self, directory: Path, size_limit: int, eviction_policy: str, ttl: float | None):
        import diskcache  # local: keeps `import mlxc.store` cheap for --help

        self.directory = Path(directory)
        self.ttl = ttl
        self.eviction_policy = eviction_policy
        self.size_limit = size_limit
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)  # answers may hold private prompts
            self._cache = diskcache.Cache(
                str(self.directory),
                disk=diskcache.JSONDisk,
                disk_compress_level=6,
                size_limit=size_limit,
                eviction_policy=eviction_policy,
                statistics=True,
            )
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(
                f"cannot open the response cache in {self.directory}: {exc}. "
                "Choose a writable folder with --cache-dir or MLXC_CACHE_DIR."
            ) from exc

    def get(self, key: str) -> dict[str, Any] | None:
        return self._cache.get(key)

    def contains(self, key: str) -> bool:
        return key in self._cache

    def set(self, key: str, value: dict[str, Any]) -> None:
        try:
            self._cache.set(key, value, expire=self.ttl)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"cannot write the response cache in {self.directory}: {exc}") from exc

    def stats(self) -> StoreStats:
        hits, misses = self._cache.stats()
        return StoreStats(
            hits=hits,
            misses=misses,
            cached_items=len(self._cache),
            size_bytes=self._cache.volume(),
            directory=str(self.directory),
            backend="disk",
            eviction_policy=self.eviction_policy,
            size_limit=self.size_limit,
        )

    def clear(self) -> int:
        removed = self._cache.clear()
        self._cache.stats(reset=True)
        return removed

    def close(self) -> None:
        self._cache.close()


class RedisStore:
    """Redis, for several servers sharing one cache. Keys live under `mlxc:`; clearing deletes
    only those, never the whole database. Size and eviction follow the server's maxmemory."""

    PREFIX = "mlxc:resp:"
    STATS = "mlxc:stats"

    def __init__(self, url: str, ttl: float | None):
        import redis

        self.url = url
        self.ttl = ttl
        try:
            self._redis = redis.Redis.from_url(url, socket_connect_timeout=2)
            self._redis.ping()
        except redis.RedisError as exc:
            raise StoreError(
                f"cannot reach Redis at {url}: {exc}. Is redis-server running?"
            ) from exc

    def get(self, key: str) -> dict[str, Any] | None:
        raw = self._redis.get(self.PREFIX + key)
        self._redis.hincrby(self.STATS, "hits" if raw is not None else "misses", 1)
        return json.loads(raw) if raw is not None else None

    def contains(self, key: str) -> bool:
        return bool(self._redis.exists(self.PREFIX + key))

    def set(self, key: str, value: dict[str, Any]) -> None:
        ttl_ms = int(self.ttl * 1000) if self.ttl else None
        self._redis.set(self.PREFIX + key, json.dumps(value, ensure_ascii=False), px=ttl_ms)

    def _keys(self) -> list[bytes]:
        return list(self._redis.scan_iter(match=self.PREFIX + "*", count=1000))

    def stats(self) -> StoreStats:
        counts = self._redis.hgetall(self.STATS)
        keys = self._keys()
        pipe = self._redis.pipeline()
        for k in keys:
            pipe.strlen(k)
        policy = self._redis.config_get("maxmemory-policy").get("maxmemory-policy", "")
        limit = int(self._redis.config_get("maxmemory").get("maxmemory", 0))
        return StoreStats(
            hits=int(counts.get(b"hits", 0)),
            misses=int(counts.get(b"misses", 0)),
            cached_items=len(keys),
            size_bytes=sum(pipe.execute()) if keys else 0,
            directory=self.url,
            backend="redis",
            eviction_policy=str(policy),
            size_limit=limit,
        )

    def clear(self) -> int:
        keys = self._keys()
        for i in range(0, len(keys), 500):
            self._redis.delete(*keys[i : i + 500])
        self._redis.delete(self.STATS)
        return len(keys)

    def close(self) -> None:
        self._redis.close()


def open_store(settings: Settings) -> ResponseStore:
    """The store the settings name: Redis when MLXC_REDIS_URL is set, else the disk cache."""
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.ttl_seconds)
    return DiskStore(
        settings.response_dir,
        settings.cache_size_limit,
        settings.eviction_policy,
        settings.ttl_seconds,
    )

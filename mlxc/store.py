"""Response store: request key -> finished answer, on disk (diskcache) or in Redis.

Values are JSON, never pickle: anyone who can write the cache folder must not be able to run
code in mlxc. Hit/miss counters live in the store itself, so they survive restarts and are
shared by every process that opens it. Imports nothing heavy: this is the cache-hit path.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from mlxc.config import Settings
from mlxc.disk_full import disk_refused, sound

log = logging.getLogger("mlxc.store")
DB_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")

class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says where and what to do."""


class StoreDamaged(StoreError):
    """SQLite cannot read the store's database; `mlxc cache clear` removes it."""


class StoreUnavailable(StoreError):
    """The store is sound but cannot be used now (a full disk, Redis away): answers are
    generated uncached until it works again (mlxc.store_guard). `reason` names no path."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


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
    refused_rows: int = 0  # rows this process read as misses: not JSON mlxc wrote

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


def damaged(directory: Path, exc: BaseException) -> StoreDamaged:
    """The error for a store SQLite cannot read: what is wrong and the command that fixes it."""
    return StoreDamaged(
        f"the response cache {Path(directory) / 'cache.db'} is damaged ({exc}). "
        "Remove it with `mlxc cache clear --responses-only` (the cached answers are lost; "
        "the prefix cache and the models are kept)."
    )


class DiskStore:
    """diskcache on local disk. Thread-safe and process-safe; each write is one atomic
    SQLite transaction, so a killed process leaves the cache readable. Rows are read as
    JSON only (mlxc.jsondisk): a planted or damaged row is a counted miss, then dropped."""

    def __init__(self, directory: Path, size_limit: int, eviction_policy: str, ttl: float | None):
        import diskcache  # local: keeps `import mlxc.store` cheap for --help

        from mlxc.config import private_dir
        from mlxc.jsondisk import SafeJSONDisk

        self.directory = Path(directory)
        self.ttl = ttl
        self.eviction_policy = eviction_policy
        self.size_limit = size_limit
        self.refused = 0
        # One call at a time in this process: a server's worker threads would otherwise meet
        # in SQLite's write lock (every get updates the LRU time and the hit counters), whose
        # busy handler sleeps up to 100 ms a try: under 28 clients, 1% of hits took ~1 s.
        self._lock = threading.Lock()
        try:
            private_dir(self.directory)  # answers may hold private prompts
            db = self.directory / "cache.db"
            if db.exists() and not stat.S_ISREG(db.lstat().st_mode):  # a FIFO would hang
                raise sqlite3.DatabaseError("cache.db is not a regular file")
            self._cache = diskcache.Cache(
                str(self.directory),
                disk=SafeJSONDisk,
                disk_compress_level=6,
                size_limit=size_limit,
                eviction_policy=eviction_policy,
                statistics=True,
            )
            for name in DB_FILES:
                if (self.directory / name).exists():
                    os.chmod(self.directory / name, 0o600)
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "open") from exc

    def _failure(self, exc: OSError | sqlite3.Error, doing: str = "write") -> StoreError:
        """What a failed call means: a full disk while the file is sound is unavailable (the
        next call may work), a file SQLite cannot read is damaged, anything else an error."""
        if disk_refused(exc) and sound(self.directory / "cache.db"):
            try:
                full = os.statvfs(self.directory).f_bavail == 0
            except OSError:
                full = True
            what = "is full" if full else "refused a write"
            return StoreUnavailable(
                f"the disk holding the response cache {self.directory} {what} ({exc}); the "
                "cache itself is intact: free some space",
                reason=f"the response cache's disk {what}",
            )
        if isinstance(exc, sqlite3.DatabaseError):
            return damaged(self.directory, exc)
        if doing == "open":
            return StoreError(
                f"cannot open the response cache in {self.directory}: {exc}. "
                "Choose a writable folder with --cache-dir or MLXC_CACHE_DIR."
            )
        return StoreError(f"cannot {doing} the response cache in {self.directory}: {exc}")

    def get(self, key: str) -> dict[str, Any] | None:
        try:
            with self._lock:
                value = self._cache.get(key)
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "read") from exc
        if value is None and (reason := self._cache.disk.take_refusal()):
            self._drop(key, reason)
        return value

    def _drop(self, key: str, reason: str) -> None:
        self.refused += 1
        if self.refused == 1:  # once per process: a folder full of them must not flood
            log.warning("mlxc: ignored and removed a response-cache row in %s: %s; further "
                        "such rows are counted in `cache stats` (refused_rows)",
                        self.directory, reason)
        try:
            self._cache.delete(key)
        except (OSError, sqlite3.Error):
            pass  # read-only folder: it stays a miss

    def contains(self, key: str) -> bool:
        try:
            with self._lock:
                return key in self._cache
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "read") from exc

    def set(self, key: str, value: dict[str, Any]) -> None:
        try:
            with self._lock:
                self._cache.set(key, value, expire=self.ttl)
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc) from exc

    def stats(self) -> StoreStats:
        try:
            with self._lock:
                return self._stats()
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "read") from exc

    def _stats(self) -> StoreStats:
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
            refused_rows=self.refused,
        )

    def clear(self) -> int:
        try:
            with self._lock:
                removed = self._cache.clear()
                self._cache.stats(reset=True)
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "clear") from exc
        return removed

    def close(self) -> None:
        self._cache.close()

    @staticmethod
    def destroy(directory: Path) -> None:
        """Remove a store that cannot be opened: its database and diskcache's value folders
        (two hex digits), nothing else. For `mlxc cache clear` on a damaged store."""
        import shutil

        directory = Path(directory)
        for name in DB_FILES:
            path = directory / name
            if path.exists() or path.is_symlink():
                path.unlink()
        for sub in directory.glob("[0-9a-f][0-9a-f]"):
            if sub.is_dir() and not sub.is_symlink():
                shutil.rmtree(sub)


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

    def get(self, key: str) -> dict[str, Any] | None:
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


def private_folders(settings: Settings) -> None:
    """The cache folder and the prefix cache's, created (or tightened) 0700 before anything
    is written into them."""
    from mlxc.config import private_dir

    private_dir(settings.cache_dir)
    private_dir(settings.prefix_dir)


def open_store(settings: Settings) -> ResponseStore:
    """The store the settings name: Redis when MLXC_REDIS_URL is set, else the disk cache."""
    if settings.redis_url:
        return RedisStore(settings.redis_url, settings.ttl_seconds)
    try:
        private_folders(settings)
    except OSError as exc:
        raise StoreError(
            f"cannot create the cache folder {settings.cache_dir}: {exc}. "
            "Choose a writable folder with --cache-dir or MLXC_CACHE_DIR."
        ) from exc
    return DiskStore(
        settings.response_dir,
        settings.cache_size_limit,
        settings.eviction_policy,
        settings.ttl_seconds,
    )

"""Response store: request key -> finished answer, on disk (diskcache) or in Redis.

Values are JSON, never pickle: anyone who can write the cache folder must not be able to run
code in mlxc. Hit/miss counters live in the store itself, so they survive restarts and are
shared by every process that opens it (the disk store writes them in batches: see
mlxc.store_tally for the bound on the lag). Imports nothing heavy: this is the cache-hit path.
"""

from __future__ import annotations

import atexit
import logging
import os
import sqlite3
import stat
import threading
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from mlxc.config import Settings
from mlxc.disk_full import disk_refused, sound

log = logging.getLogger("mlxc.store")
DB_FILES = ("cache.db", "cache.db-wal", "cache.db-shm")
# diskcache's own read (Cache.get), without the write it makes with statistics or LRU/LFU on:
# those counts and touches are mlxc.store_tally's.
_READ = ("SELECT rowid, mode, filename, value FROM Cache WHERE key = ? AND raw = ?"
         " AND (expire_time IS NULL OR expire_time > ?)")
_OPEN_STORES: weakref.WeakSet = weakref.WeakSet()  # flushed at exit: `ask` may not close


class StoreError(RuntimeError):
    """The store cannot be opened or written; the message says where and what to do."""


class StoreDamaged(StoreError):
    """SQLite cannot read the store's database; `mlxc cache clear` removes it."""


class StoreUnavailable(StoreError):
    """The store is sound but cannot be used now (a full disk, Redis away): answers are
    generated uncached until it works again (mlxc.store_guard). `reason` names no path;
    `reads_work`: only writes are refused (a full disk), the stored answers still read."""

    def __init__(self, message: str, reason: str, reads_work: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.reads_work = reads_work


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
    """What every backend offers. `get` counts a hit or a miss (`count_miss=False`: a hit
    only); `contains` counts nothing."""

    def get(self, key: str, count_miss: bool = True) -> dict[str, Any] | None: ...
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
    JSON only (mlxc.jsondisk): a planted or damaged row is a counted miss, then dropped.
    A read is one SELECT on the thread's own connection, under no lock; what it would write
    (counts, the LRU time or LFU count) is batched by mlxc.store_tally."""

    def __init__(self, directory: Path, size_limit: int, eviction_policy: str, ttl: float | None):
        import diskcache  # local: keeps `import mlxc.store` cheap for --help

        from mlxc.config import private_dir
        from mlxc.jsondisk import SafeJSONDisk

        self.directory = Path(directory)
        self.ttl = ttl
        self.eviction_policy = eviction_policy
        self.size_limit = size_limit
        self.refused = 0
        # One write at a time in this process: threads would otherwise meet in SQLite's
        # write lock, whose busy handler sleeps up to 100 ms a try (under 28 clients, 1% of
        # hits took ~1 s when every read wrote). Reads take no lock: they write nothing.
        self._lock = threading.RLock()
        from mlxc.store_tally import Tally

        self._tally = Tally(eviction_policy, self._write_tally)
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
                statistics=False,  # counted by self._tally, into the same Settings rows
            )
            for name in DB_FILES:
                if (self.directory / name).exists():
                    os.chmod(self.directory / name, 0o600)
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "open") from exc
        if not _OPEN_STORES:
            atexit.register(_flush_at_exit)
        _OPEN_STORES.add(self)

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
                reads_work=True,  # a read writes nothing (mlxc.store_tally)
            )
        if isinstance(exc, sqlite3.DatabaseError):
            return damaged(self.directory, exc)
        if doing == "open":
            return StoreError(
                f"cannot open the response cache in {self.directory}: {exc}. "
                "Choose a writable folder with --cache-dir or MLXC_CACHE_DIR."
            )
        return StoreError(f"cannot {doing} the response cache in {self.directory}: {exc}")

    def get(self, key: str, count_miss: bool = True) -> dict[str, Any] | None:
        try:
            found = self._read(key)
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "read") from exc
        if found is None:
            if count_miss:
                self._tally.miss()
            if reason := self._cache.disk.take_refusal():
                self._drop(key, reason)
            return None
        rowid, db_key, value = found
        self._tally.hit(rowid, db_key)
        return value

    def _read(self, key: str) -> tuple[int, bytes, dict[str, Any]] | None:
        """(rowid, stored key, value), or None: absent, expired, or refused by the disk."""
        cache = self._cache
        db_key, raw = cache.disk.put(key)
        rows = cache._sql(_READ, (db_key, raw, time.time())).fetchall()
        if not rows:
            return None
        ((rowid, mode, filename, db_value),) = rows
        try:
            return rowid, db_key, cache.disk.fetch(mode, filename, db_value, False)
        except OSError:  # the value file went away meanwhile, or a row mlxc did not write
            return None

    def _write_tally(self, body: Any) -> None:
        """Run the tally's statements in one transaction under the write lock."""
        try:
            with self._lock, self._cache.transact():
                body(self._cache._sql)
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc) from exc

    def flush(self) -> None:
        """Write the counts and touches not written yet (mlxc.store_tally)."""
        self._tally.flush()

    def _drop(self, key: str, reason: str) -> None:
        self.refused += 1
        if self.refused == 1:  # once per process: a folder full of them must not flood
            log.warning("mlxc: ignored and removed a response-cache row in %s: %s; further "
                        "such rows are counted in `cache stats` (refused_rows)",
                        self.directory, reason)
        try:
            with self._lock:
                self._cache.delete(key)
        except (OSError, sqlite3.Error):
            pass  # read-only folder: it stays a miss

    def contains(self, key: str) -> bool:
        try:
            return key in self._cache
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "read") from exc

    def set(self, key: str, value: dict[str, Any]) -> None:
        try:
            with self._lock:
                self._tally.flush()  # so that this write's evictions see every read
                self._cache.set(key, value, expire=self.ttl)
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc) from exc

    def stats(self) -> StoreStats:
        try:
            return self._stats()
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "read") from exc

    def _stats(self) -> StoreStats:
        with self._lock:  # a flush moves counts from memory to disk under it: none twice
            hits, misses = self._cache.reset("hits"), self._cache.reset("misses")
            more_hits, more_misses = self._tally.pending()
        return StoreStats(
            hits=hits + more_hits,
            misses=misses + more_misses,
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
                self._tally.discard()
                removed = self._cache.clear()
                self._cache.reset("hits", 0)
                self._cache.reset("misses", 0)
        except (OSError, sqlite3.Error) as exc:
            raise self._failure(exc, "clear") from exc
        return removed

    def close(self) -> None:
        _OPEN_STORES.discard(self)
        self._tally.stop()
        try:
            self._tally.flush()
        except StoreError as exc:  # a full disk (already warned of): counts lost, no entry
            log.debug("mlxc: the response cache's last counts were not saved: %s", exc)
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


def _flush_at_exit() -> None:
    for store in list(_OPEN_STORES):
        try:
            store.flush()
        except StoreError:
            pass  # a full disk at exit: lost counts, as a kill -9 would lose them


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


from mlxc.store_redis import RedisStore  # noqa: E402  (it uses this module's errors)

__all__ = ["DiskStore", "RedisStore", "ResponseStore", "StoreDamaged", "StoreError",
           "StoreStats", "StoreUnavailable", "open_store"]

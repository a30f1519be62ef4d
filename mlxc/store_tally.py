"""What the disk store's reads would write, kept in this process and written in batches.

diskcache's `get` with statistics on and an LRU/LFU policy is a write transaction per read:
the hit or miss counter, then the row's access time or count. Under many clients those
writes were the hit path's serial section (issue 30, point 7). Here a read is one SELECT;
its counts and its touch of the row are noted in memory and written by `flush` in one
transaction: at the latest FLUSH_SECONDS after the first unwritten one (a timer), before
every write this process makes (so its own evictions see every read, as diskcache's would),
and on close or exit. What may lag: another process's figures and evictions see this one's
reads up to FLUSH_SECONDS late, and a kill -9 loses at most that long's counts and touches,
never an entry. This process's own figures are exact (disk + unwritten).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

FLUSH_SECONDS = 1.0
log = logging.getLogger("mlxc.store")

# How each of diskcache's policies updates a row on read (diskcache.core.EVICTION_POLICY's
# 'get'), for n reads, the last at time t. The rowid and the key must both match: a row
# evicted by another process meanwhile is not touched, nor one that took its rowid.
_TOUCH = {
    "least-recently-used": "UPDATE Cache SET access_time = max(access_time, :t)"
                           " WHERE rowid = :rowid AND key = :key",
    "least-frequently-used": "UPDATE Cache SET access_count = access_count + :n"
                             " WHERE rowid = :rowid AND key = :key",
}
_COUNT = "UPDATE Settings SET value = value + ? WHERE key = ?"


class Tally:
    """Unwritten hits, misses and row touches. Thread-safe. `write(body)` is the store's:
    it runs `body(sql)` in one transaction under the store's write lock."""

    def __init__(self, eviction_policy: str, write: Callable[[Callable[[Callable], None]], None],
                 seconds: float = FLUSH_SECONDS) -> None:
        self._touch_sql = _TOUCH.get(eviction_policy)
        self._write = write
        self.seconds = seconds
        self._lock = threading.Lock()
        self._due = threading.Condition(self._lock)  # something unwritten: the flusher wakes
        self._stopped = threading.Event()
        self._flusher: threading.Thread | None = None
        self.hits = 0
        self.misses = 0
        self._touched: dict[int, tuple[bytes, int, float]] = {}  # rowid -> (key, n, last t)

    def hit(self, rowid: int, db_key: bytes) -> None:
        now = time.time()
        with self._lock:
            self.hits += 1
            if self._touch_sql is not None:
                _key, n, _t = self._touched.get(rowid, (db_key, 0, now))
                self._touched[rowid] = (db_key, n + 1, now)
            self._wake()

    def miss(self) -> None:
        with self._lock:
            self.misses += 1
            self._wake()

    def _wake(self) -> None:  # under self._lock
        if self._flusher is None:  # one thread (so one SQLite connection) for the store's life
            self._flusher = threading.Thread(target=self._flush_every, daemon=True,
                                             name="mlxc-store-tally")
            self._flusher.start()
        self._due.notify()

    def _flush_every(self) -> None:
        """The flusher: once something is unwritten, wait `seconds`, write it, again."""
        while not self._stopped.is_set():
            with self._lock:
                while not self._unwritten() and not self._stopped.is_set():
                    self._due.wait()
            if self._stopped.wait(self.seconds):
                return  # close() flushes what is left
            try:
                self.flush()
            except Exception as exc:  # a full disk, a lock held too long: kept for the next
                log.debug("mlxc: response-cache counts not written yet: %s", exc)

    def pending(self) -> tuple[int, int]:
        with self._lock:
            return self.hits, self.misses

    def discard(self) -> None:
        """Forget what is unwritten (the store was cleared: its counts start from zero)."""
        with self._lock:
            self.hits = self.misses = 0
            self._touched = {}

    def flush(self) -> None:
        """Write what is unwritten in one transaction (`write` runs it under the store's
        write lock, where the figures are read too); on failure it is kept for the next."""
        taken: tuple[int, int, dict] | None = None

        def body(sql: Callable) -> None:
            nonlocal taken
            with self._lock:
                taken = self.hits, self.misses, self._touched
                self.hits = self.misses = 0
                self._touched = {}
            hits, misses, touched = taken
            if hits:
                sql(_COUNT, (hits, "hits"))
            if misses:
                sql(_COUNT, (misses, "misses"))
            for rowid, (key, n, t) in touched.items():
                sql(self._touch_sql, {"rowid": rowid, "key": key, "n": n, "t": t})

        if not self.unwritten():
            return
        try:
            self._write(body)
        except BaseException:
            if taken is not None:
                self._give_back(*taken)
            raise

    def unwritten(self) -> bool:
        with self._lock:
            return self._unwritten()

    def _unwritten(self) -> bool:
        return bool(self.hits or self.misses or self._touched)

    def _give_back(self, hits: int, misses: int, touched: dict) -> None:
        with self._lock:
            self.hits += hits
            self.misses += misses
            for rowid, (key, n, t) in touched.items():
                _key, m, later = self._touched.get(rowid, (key, 0, t))
                self._touched[rowid] = (key, n + m, max(t, later))

    def stop(self) -> None:
        """End the flusher (close() flushes once more itself)."""
        self._stopped.set()
        with self._lock:
            self._due.notify()

"""The response store as the service uses it: a failure that passes (a full disk, Redis gone:
StoreUnavailable) turns the cache off for a while instead of failing the request. Answers
are then generated and not stored (generation needs no cache), /health says `degraded` with
the reason, and the store is tried again after a backoff (1 s, doubling to 30 s); the first
call that works ends it. On a full disk only writes are refused: stored answers are still
read meanwhile, and only a write that works ends it. A damaged store (StoreDamaged) and
other errors pass through as before: they need the user, not time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from mlxc.store import ResponseStore, StoreStats, StoreUnavailable

log = logging.getLogger("mlxc.store")
T = TypeVar("T")


@dataclass(frozen=True)
class Degraded:
    """Why the cache is off, since when, and when it is tried next (time.monotonic)."""

    reason: str  # names no path or URL: the open /health shows it
    detail: str  # the whole message: where, what, and what to do
    since: float
    retry_at: float
    failures: int = 1
    reads_work: bool = False  # a full disk: `get` still reads, only writes wait

    def retry_in(self, now: float) -> float:
        return max(0.0, self.retry_at - now)


class GuardedStore:
    """A ResponseStore over one opened on first use. Thread-safe: store calls run outside the
    lock, so a slow store holds up no other thread. Only `get` and `set` try a degraded store
    again: on a full disk the figures still read, and that must not count as recovered."""

    BACKOFF = 1.0
    BACKOFF_LIMIT = 30.0

    def __init__(self, opener: Callable[[], ResponseStore],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._opener = opener
        self._clock = clock
        self._store: ResponseStore | None = None
        self._open_lock = threading.Lock()
        self._lock = threading.Lock()
        self.degraded: Degraded | None = None

    def _opened(self) -> ResponseStore:
        with self._open_lock:
            if self._store is None:
                self._store = self._opener()
            return self._store

    def _call(self, use: Callable[[ResponseStore], T], otherwise: T, retry: bool = True,
              read: bool = False) -> T:
        """`use(store)`, or `otherwise` while degraded and not yet due (or not a retry). A
        read while only writes are refused is made, and proves nothing about writes."""
        problem = self.degraded
        reading = read and problem is not None and problem.reads_work
        if problem is not None and not reading and (
                not retry or self._clock() < problem.retry_at):
            return otherwise
        try:
            result = use(self._opened())
        except StoreUnavailable as exc:
            self._failed(exc)
            return otherwise
        if problem is not None and not reading:
            self._recovered()
        return result

    def _failed(self, exc: StoreUnavailable) -> None:
        now = self._clock()
        with self._lock:
            before = self.degraded
            if before is not None and now < before.retry_at:
                return  # a try made at the same time failed first: the backoff is counted
            failures = before.failures + 1 if before else 1
            wait = min(self.BACKOFF * 2 ** (failures - 1), self.BACKOFF_LIMIT)
            since = before.since if before else now
            self.degraded = Degraded(exc.reason, str(exc), since, now + wait, failures,
                                     exc.reads_work)
        if before is None:  # one warning per outage, however many requests it touches
            log.warning("mlxc: warning: %s — answering without the response cache until it "
                        "works again", exc)

    def _recovered(self) -> None:
        with self._lock:
            was, self.degraded = self.degraded, None
        if was is not None:
            log.warning("mlxc: the response cache works again (it was off %.0f s: %s)",
                        self._clock() - was.since, was.reason)

    # -- ResponseStore ---------------------------------------------------------------------

    def get(self, key: str, count_miss: bool = True) -> dict[str, Any] | None:
        """The stored value, or None when absent or while the store is unavailable."""
        return self._call(lambda store: store.get(key, count_miss), None, read=True)

    def contains(self, key: str) -> bool:
        return self._call(lambda store: store.contains(key), False, retry=False)

    def set(self, key: str, value: dict[str, Any]) -> None:
        """Stores `value`; while the store is unavailable it is dropped (not queued)."""
        self._call(lambda store: store.set(key, value), None)

    def stats(self) -> StoreStats:
        """The store's figures; StoreUnavailable while degraded (/health shows the reason)."""
        stats = self._call(lambda store: store.stats(), None, retry=False)
        if stats is None:
            problem = self.degraded
            raise StoreUnavailable(problem.detail if problem else "the store is unavailable",
                                   problem.reason if problem else "unavailable")
        return stats

    def clear(self) -> int:
        return self._opened().clear()

    def close(self) -> None:
        with self._open_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

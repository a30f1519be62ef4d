"""Limits at the connection level, below the ASGI app: a deadline for each request head,
a cap on open connections, and a log that says each cause once per interval.

uvicorn (h11) holds a connection that sends half a request head forever, and a keep-alive
connection that trickles one byte at a time never times out; enough of them exhaust the
process's file descriptors and `/health` stops answering. `guarded_protocol` returns
uvicorn's h11 protocol with:

- a head deadline: from a connection's first byte (or its opening) until the request
  head is complete; past it, `408` and close;
- a cap on open connections: at the cap, a new connection first evicts the oldest one that
  is only waiting for a request head (idle keep-alive or slow sender), so a slowloris
  flood cannot lock out a real client; if every connection is busy, the new one gets a
  clean `503` and is closed.

The request body's deadline is the guard middleware's (mlxc.server.guard).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

REFUSED = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n"
           b"content-length: 41\r\nretry-after: 1\r\nconnection: close\r\n\r\n"
           b"too many connections; retry in a moment\r\n")
TOO_SLOW = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\n"
            b"content-length: 39\r\nconnection: close\r\n\r\n"
            b"the request head did not arrive in time")


class Throttle:
    """Say each cause at most once per `interval` seconds; the next line counts the rest.
    For the event loop's thread (not locked)."""

    def __init__(self, say: Callable[[str], None], interval: float = 60.0) -> None:
        self.say = say
        self.interval = interval
        self._last: dict[str, tuple[float, int]] = {}

    def __call__(self, cause: str, line: str) -> None:
        now = time.monotonic()
        last, quiet = self._last.get(cause, (-self.interval, 0))
        if now - last < self.interval:
            self._last[cause] = (last, quiet + 1)
            return
        more = f" ({quiet} more since the last note)" if quiet else ""
        self._last[cause] = (now, 0)
        self.say(line + more)


class ThrottledLog(logging.Filter):
    """A logging filter (for uvicorn's own loggers) that passes each message once per
    interval: 'Invalid HTTP request received.' must not fill the disk under a flood."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = str(record.msg)
        if now - self._last.get(key, -self.interval) < self.interval:
            return False
        self._last[key] = now
        return True


def guarded_protocol(head_timeout: float, max_connections: int, note: Throttle) -> type:
    """uvicorn's h11 protocol with a head deadline and a connection cap (see the module)."""

    class GuardedH11Protocol(H11Protocol):
        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self.opened = time.monotonic()
            self.head_timer = None
            if len(self.connections) > max_connections and not self._evict_one():
                note("cap", f"refused connections: more than {max_connections} open "
                     "(--max-connections)")
                transport.write(REFUSED)
                transport.close()
                return
            self._watch_head()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            self._watch_head()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE:
                self._stop_head_timer()  # idle keep-alive: uvicorn's own timer closes it

        def connection_lost(self, exc) -> None:
            self._stop_head_timer()
            super().connection_lost(exc)

        @property
        def waiting_for_head(self) -> bool:
            """No request in progress: between requests, or a head still arriving."""
            busy = self.cycle is not None and not self.cycle.response_complete
            return self.conn.their_state is h11.IDLE and not busy

        def _watch_head(self) -> None:
            """From a connection's opening or a request's first byte to its whole head."""
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                self._stop_head_timer()
            elif self.head_timer is None:
                self.head_timer = self.loop.call_later(head_timeout, self._head_too_slow)

        def _stop_head_timer(self) -> None:
            if self.head_timer is not None:
                self.head_timer.cancel()
                self.head_timer = None

        def _head_too_slow(self) -> None:
            self.head_timer = None
            if self.waiting_for_head and not self.transport.is_closing():
                note("head", f"closed connections whose request head took over "
                     f"{head_timeout:g} s (--request-timeout)")
                self.close_now(TOO_SLOW)

        def close_now(self, reply: bytes = b"") -> None:
            self._stop_head_timer()
            self._unset_keepalive_if_required()
            if reply:
                self.transport.write(reply)
            self.transport.close()

        def _evict_one(self) -> bool:
            idle = [c for c in self.connections
                    if c is not self and isinstance(c, GuardedH11Protocol)
                    and c.waiting_for_head and not c.transport.is_closing()]
            if not idle:
                return False
            oldest = min(idle, key=lambda c: c.opened)
            note("evict", f"closed the oldest idle connection: more than {max_connections} "
                 "open (--max-connections)")
            oldest.close_now()
            return True

    return GuardedH11Protocol

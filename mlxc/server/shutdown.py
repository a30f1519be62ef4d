"""Stopping `mlxc serve` on SIGTERM (systemd, docker, kill) as cleanly as on Ctrl-C.

uvicorn handles both alike: it stops accepting, gives the requests in flight
`timeout_graceful_shutdown` seconds (`--shutdown-timeout`), cancels what is left (a cancelled
request cancels its generation), and then raises the signal again for the handler that was
there before its own. For SIGINT that is Python's KeyboardInterrupt, so the caller's clean-up
runs; for SIGTERM it is the default action, which ends the process on the spot: the prefix
blocks still queued for the disk writer and the counters not yet saved were lost, and the
exit status said "killed". Here SIGTERM's handler under uvicorn's does nothing, so `serve`
returns, its clean-up (the engine's last writes, the store) runs, and the process exits 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
import threading
from collections.abc import Callable

import uvicorn


class _Server(uvicorn.Server):
    """uvicorn's server, saying what stopping waits for."""

    def __init__(self, config: uvicorn.Config, say: Callable[[str], None]) -> None:
        super().__init__(config)
        self.say = say

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if running := len(self.server_state.tasks):
            self.say(
                f"stopping: no new connections; {running} request(s) in flight get up "
                f"to {self.config.timeout_graceful_shutdown:g} s (--shutdown-timeout)"
            )
        else:
            self.say("stopping: no new connections")
        await super().shutdown(sockets)


class CancelledInOneLine(logging.Filter):
    """uvicorn logs a request cancelled at the end of the grace period as an "Exception in
    ASGI application" with a traceback; it is the shutdown doing what it was asked: one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        kind = record.exc_info[0] if record.exc_info else None
        if kind is not None and issubclass(kind, asyncio.CancelledError):
            record.msg, record.args = "a request was cancelled: the server stopped first", ()
            record.exc_info = record.exc_text = None
        return True


def _stopped(_signum: int, _frame: object) -> None:
    """What uvicorn's re-raised SIGTERM reaches once the server has stopped: nothing to do,
    the caller's clean-up comes next."""


def serve_until_stopped(
    config: uvicorn.Config, sock: socket.socket, say: Callable[[str], None]
) -> None:
    """Serve on `sock` until SIGINT or SIGTERM; returns after SIGTERM (KeyboardInterrupt
    after SIGINT, as before) once the requests in flight are done or cancelled. A second
    SIGTERM during the caller's clean-up ends the process at once, as before."""
    main = threading.current_thread() is threading.main_thread()  # signals need the main one
    # What loading the model and the app made (~10^5 objects: tokenizer, templates, routes)
    # lives as long as the server: out of the collector's reach, a full collection under
    # load does not walk it (one took ~100+ ms on a 2-core CPU; benchmarks/server_load.py).
    gc.freeze()
    previous = signal.signal(signal.SIGTERM, _stopped) if main else None
    logging.getLogger("uvicorn.error").addFilter(CancelledInOneLine())
    try:
        _Server(config, say).run(sockets=[sock])
    finally:  # uvicorn raised SIGTERM again inside run(): _stopped has had it
        if main:
            signal.signal(signal.SIGTERM, previous)

"""Miss explanations on the server: each generation's prefix report (engine/kv/divergence.py)
resolved once in a worker thread, said in the `X-Mlxc-Prefix` header and one INFO line, and
the last 100 kept in memory for `GET /v1/cache/misses` (the dashboard, `mlxc cache misses`).

Excerpts hold the user's text: they live in this process's memory only, are never logged or
written, are shown only past the server's auth, and `--no-miss-excerpts` /
`MLXC_MISS_EXCERPTS=0` turns them off (they are then never decoded).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxc.server.errors import check_api_key
from mlxc.server.state import get_state

HEADER = "X-Mlxc-Prefix"
KEPT = 100
log = logging.getLogger("mlxc.prefix.misses")


async def _authorized(request: Request) -> None:  # as pipeline.authorized (which imports us)
    check_api_key(request, get_state(request).options.api_key)


router = APIRouter(dependencies=[Depends(_authorized)])


class _Say(logging.Handler):
    def __init__(self, say: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.say = say

    def emit(self, record: logging.LogRecord) -> None:
        self.say(record.getMessage())


def log_to(say: Callable[[str], None]) -> None:
    """Send the INFO lines to `say` (mlxc serve's request log)."""
    log.setLevel(logging.INFO)
    log.addHandler(_Say(say))
    log.propagate = False


class Misses:
    """The last `KEPT` generations' reports, newest last. Thread-safe."""

    def __init__(self, excerpts: bool = True) -> None:
        self.excerpts = excerpts
        self._lock = threading.Lock()
        self._rows: deque[dict[str, Any]] = deque(maxlen=KEPT)
        self.count = 0

    def add(self, row: dict[str, Any]) -> None:
        with self._lock:
            self.count += 1
            self._rows.append({"seq": self.count, **row})

    def rows(self, since: int = 0) -> list[dict[str, Any]]:
        with self._lock:
            return [r for r in self._rows if r["seq"] > since]


def _report(reply: Any) -> Any:
    generation = getattr(reply, "generation", None)
    return getattr(generation, "prefix", None)


async def note(state: Any, reply: Any, route: str) -> str | None:
    """Resolve and record this reply's report (once, however many clients share it); the
    header's value, or None when there is none yet (a request still waiting its turn)."""
    report = _report(reply)
    if report is None:
        return None
    misses: Misses = state.misses
    if report._source is not None:  # noqa: SLF001 - pending: resolve off the event loop
        await run_in_threadpool(report.resolve, misses.excerpts)
    if report.recorded:
        return report.header()
    report.recorded = True
    header = report.header()
    log.info("prefix %s %s", route, header)  # no excerpt: logs never hold the user's text
    misses.add({"time": round(time.time(), 3), "route": route, "status": reply.status,
                **report.as_dict(misses.excerpts)})
    return header


def hit_header(prompt_tokens: int) -> str:
    return f"reused={prompt_tokens}/{prompt_tokens}; tier=response; diverged=none"


@router.get("/v1/cache/misses")
async def recent_misses(request: Request) -> Response:
    """The last 100 generations' prefix reuse, oldest first; `?since=<seq>` for newer only."""
    try:
        since = int(request.query_params.get("since", "0"))
    except ValueError:
        since = 0
    misses: Misses = get_state(request).misses
    return JSONResponse({"object": "list", "excerpts": misses.excerpts, "total": misses.count,
                         "data": misses.rows(since)})

"""Repeated cache hits, and /health, answered before FastAPI: no routing, no dependency
solving, no JSON or pydantic parsing of a body already seen (issue 30, point 7: under 32
clients those were most of the event loop's time per hit).

A POST to chat completions, completions or messages whose exact body bytes went through
the normal route before is looked up again from what that route made of them (`Prepared`:
the parsed body, the canonical GenerationRequest, the model), in the store, on the hit
threads, counted as the normal route counts a hit; the answer is written by the adapter's
own `respond`, so the bytes and headers are the normal route's. Nothing but that mapping is
kept here: the answer is read from the store every time, so a cleared cache or an expired
entry is never served from here. Anything else falls through to the app with the body
replayed unchanged: a body not seen yet, a `Cache-Control` header, a missing or wrong API
key, a body over the limit, a store miss, a store error, a client that hung up.

It sits inside the guard (Host, Origin, Content-Type, the body deadline) and the request
log (the X-Mlxc-Cache header, the per-request metrics and log line), so those apply to
both paths alike.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxc.server import health
from mlxc.server.errors import ApiError, error_response
from mlxc.server.flow import ClientGone, begin
from mlxc.server.guard import key_given
from mlxc.server.pipeline import Prepared
from mlxc.server.state import ServerState

ROUTES = {"/v1/chat/completions": "openai", "/v1/completions": "openai",
          "/v1/messages": "anthropic"}
MAX_BODY = 64 << 10  # bodies kept for reuse; a larger one always takes the normal route
MEMO_BYTES = 8 << 20  # the bodies kept, in all (their parsed forms take a few times more)


class Memo:
    """(route, body bytes) -> Prepared, least recently used out first; event loop only."""

    def __init__(self, max_bytes: int = MEMO_BYTES) -> None:
        self.max_bytes = max_bytes
        self.size = 0
        self._entries: OrderedDict[tuple[str, bytes], Prepared] = OrderedDict()

    def get(self, key: tuple[str, bytes]) -> Prepared | None:
        prepared = self._entries.get(key)
        if prepared is not None:
            self._entries.move_to_end(key)
        return prepared

    def put(self, key: tuple[str, bytes], prepared: Prepared) -> None:
        if key in self._entries:
            return
        self._entries[key] = prepared
        self.size += len(key[1])
        while self.size > self.max_bytes:
            (_route, body), _ = self._entries.popitem(last=False)
            self.size -= len(body)

    def __len__(self) -> int:
        return len(self._entries)


def _replaying(messages: list[Message], receive: Receive,
               error: BaseException | None = None) -> Receive:
    """A receive that gives back what was already read (then the read's error, if it ended
    in one), then passes on to the connection's own."""
    queue = list(messages)

    async def replay() -> Message:
        nonlocal error
        if queue:
            return queue.pop(0)
        if error is not None:
            failed, error = error, None
            raise failed
        return await receive()

    return replay


class HitFastPath:
    """Pure ASGI middleware, innermost: see the module."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.memo = Memo()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        if method == "GET" and path == "/health":  # no route to match, no dependency
            response = await health.health(Request(scope, receive))
            await response(scope, receive, send)
            return
        if method != "POST" or path not in ROUTES:
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        declared = headers.get("content-length", "")
        if ("cache-control" in headers  # no-cache / no-store: the normal route reads them
                or not key_given(headers, self.state.options.api_key)  # its 401
                or not declared.isdigit() or int(declared) > MAX_BODY):
            await self.app(scope, receive, send)
            return
        messages: list[Message] = []
        body, whole = await self._read(messages, receive)
        if isinstance(whole, BaseException) or not whole:  # it failed, or hung up, or is big
            error = whole if isinstance(whole, BaseException) else None
            await self.app(scope, _replaying(messages, receive, error), send)
            return
        key = (path, body)
        prepared = self.memo.get(key)
        if prepared is not None and await self._answer(prepared, scope, receive, send):
            return
        await self.app(scope, _replaying(messages, receive), send)
        info = scope.get("state") or {}
        if (made := info.get("prepared")) is not None and info.get("cache") in ("hit", "miss"):
            self.memo.put(key, made)  # the route's own reading of these bytes

    async def _read(self, messages: list[Message],
                    receive: Receive) -> tuple[bytes, bool | BaseException]:
        """(body, True) once it is whole and small enough; False when it is not (a hang-up,
        too big); the exception a read raised (the guard's 408). What was read is kept in
        `messages` for the normal route."""
        size = 0
        while True:
            try:
                message = await receive()
            except BaseException as exc:  # the normal route raises it again, in its place
                return b"", exc
            messages.append(message)
            if message["type"] != "http.request":
                return b"", False
            size += len(message.get("body", b""))
            if size > MAX_BODY:
                return b"", False
            if not message.get("more_body", False):
                break
        return b"".join(m.get("body", b"") for m in messages), True

    async def _answer(self, prepared: Prepared, scope: Scope, receive: Receive,
                      send: Send) -> bool:
        """Answer a repeat from the store as the route would; False (nothing sent, nothing
        counted) when the store has no answer for it now, or cannot say."""
        state = self.state
        served = prepared.served
        try:
            reply = await asyncio.get_running_loop().run_in_executor(
                state.hit_threads, served.service.hit, prepared.request, True)
        except Exception:  # the store failed: the normal route says so in the API's shape
            return False
        if reply is None:  # cleared, expired, evicted, degraded: the normal route decides
            return False
        state.pool.use(served)  # counted as the route counts it
        state.metrics.on_fast_hit()
        request = Request(scope, receive)
        request.state.dialect = ROUTES[scope["path"]]  # as the route's dependency marks it
        response: Response
        try:
            call = await begin(state, reply, prepared.stream, request.state)
            response = await prepared.adapter.respond(state, prepared, call, request)
        except ApiError as exc:  # as app.py's handlers answer them
            if exc.status >= 500:
                request.state.error = exc.message
            response = error_response(exc, request)
        except ClientGone:
            response = Response(status_code=499)
        await response(scope, receive, send)
        return True


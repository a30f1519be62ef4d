"""Server-sent events: the wire format, and a streaming response that lets go of its
generation as soon as the client is gone."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

# An SSE comment: every client ignores it, but it resets first-byte and idle watchdogs.
KEEPALIVE = ": keep-alive\n\n"


def _json(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def data(obj: Any) -> str:
    """One OpenAI-style event: `data: {...}`."""
    return f"data: {_json(obj)}\n\n"


def event(name: str, obj: Any) -> str:
    """One named event, as Anthropic sends them: `event: name` then `data: {...}`."""
    return f"event: {name}\ndata: {_json(obj)}\n\n"


DONE = "data: [DONE]\n\n"


class EventStream(StreamingResponse):
    """text/event-stream without proxy buffering. When the client disconnects, Starlette
    cancels the sender; closing the body iterator here unsubscribes from the generation at
    once (rather than whenever the garbage collector gets to it), so the engine stops
    within a token or two."""

    def __init__(self, body: AsyncIterator[str], headers: dict[str, str] | None = None) -> None:
        super().__init__(
            body,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **(headers or {})},
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()

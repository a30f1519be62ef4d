"""One request's way through the service, shared by the OpenAI and Anthropic routes:
cache directives from the headers, the reply started off the event loop, its first event
awaited (so a failure that comes at once, like a prompt too long, is still a plain JSON
error), then either the events for a stream or the collected answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request

from mlxc.errors import EngineBusy
from mlxc.request import Answer, GenerationRequest
from mlxc.server.errors import ApiError, as_api_error
from mlxc.server.model_pool import ServedModel
from mlxc.server.state import ServerState
from mlxc.service import Reply, Service
from mlxc.stream import Delta, Event, Failed, Finished

BILLING_HEADER = "x-anthropic-billing-header:"
DISCONNECT_POLL = 0.5  # seconds between checks that a non-streaming client is still there


class ClientGone(Exception):
    """The client hung up before its answer was ready."""


def cache_directives(headers: Headers) -> tuple[bool, bool]:
    """(read, write) from `Cache-Control`: no-cache skips the lookup, no-store the write."""
    parts = headers.get("cache-control", "").split(",")
    names = {part.split("=")[0].strip().lower() for part in parts}
    return "no-cache" not in names, "no-store" not in names


def strip_billing_header(text: str) -> str:
    """Claude Code opens its system prompt with a line that changes on every request
    (`x-anthropic-billing-header: cc_version=…; cch=…;`); left in, no request from it
    would ever hit the cache, so it is dropped before keying and prompting."""
    if not text.lstrip().lower().startswith(BILLING_HEADER):
        return text
    return text.lstrip().partition("\n")[2].lstrip("\n")


def without_billing_blocks(texts: Iterable[str]) -> list[str]:
    return [t for t in (strip_billing_header(t) for t in texts) if t]


@dataclass
class Call:
    """A started reply and its events, the first one already in hand."""

    reply: Reply
    first: Event | None
    rest: AsyncIterator[Event | None]
    info: Any  # request.state: what the request log line reports

    def cached_tokens(self, answer: Answer) -> int:
        """Prompt tokens not recomputed: all of them on a hit, the reused prefix on a miss."""
        return answer.usage.prompt_tokens if self.reply.cached else answer.usage.cached_tokens

    async def events(self) -> AsyncIterator[Event | None]:
        """Every event from the first; None means `keepalive` seconds of silence. Closing
        this early unsubscribes, which cancels a generation nobody else is waiting for."""
        try:
            event = self.first
            while True:
                if isinstance(event, Finished):
                    self.info.tokens = event.answer.usage.completion_tokens
                yield event
                if event is not None and not isinstance(event, Delta):
                    return
                event = await anext(self.rest)
        finally:
            await self.rest.aclose()

    async def answer(self, request: Request) -> Answer:
        """Wait for the whole answer, checking now and then that the client is still there."""
        check_at = time.monotonic() + DISCONNECT_POLL
        async with aclosing(self.events()) as events:
            async for event in events:
                # Asked on silence and between tokens alike: a generation that streams
                # steadily to nobody is as wasteful as one stuck in prefill.
                if event is None or time.monotonic() >= check_at:
                    if await request.is_disconnected():
                        raise ClientGone
                    check_at = time.monotonic() + DISCONNECT_POLL
                if isinstance(event, Finished):
                    return event.answer
                elif isinstance(event, Failed):
                    raise as_api_error(event.error)
        raise ApiError(500, "the generation ended without an answer")


async def start(
    state: ServerState, generation_request: GenerationRequest, request: Request, stream: bool,
    model: ServedModel | None = None,
) -> Call:
    """Hit, join or start a generation through the model's service (the default's if None;
    in a worker thread: the store, a first model preparation and making room for a model
    may block), then wait for the first event or silence."""
    read, write = cache_directives(request.headers)
    service = state.pool.use(model or state.pool.default)
    try:
        # A hit on the two hit threads (no engine, no model load can hold them); the rest in
        # the shared pool, where a first request may wait for its model.
        reply = await asyncio.get_running_loop().run_in_executor(
            state.hit_threads, service.hit, generation_request, read)
        if reply is None:
            reply = await run_in_threadpool(service.start, generation_request, read, write)
    except Exception as exc:
        if isinstance(exc, EngineBusy):
            state.metrics.on_refused()
        raise as_api_error(exc) from None
    return await begin(state, reply, stream, request.state)


async def begin(state: ServerState, reply: Reply, stream: bool, info: Any) -> Call:
    """A reply counted and its first event awaited (for `start`, and for a repeated hit on
    the fast path, server/fastpath.py); `info` is request.state."""
    info.cache = reply.status
    state.metrics.on_reply(reply)
    # A stream must say something every `keepalive` seconds; a plain request only needs to
    # notice a client that left.
    keepalive = state.options.keepalive if stream else min(state.options.keepalive, DISCONNECT_POLL)
    rest = reply.aevents(keepalive)
    try:
        first = await anext(rest)
    except BaseException:
        await rest.aclose()
        raise
    if isinstance(first, Failed):
        await rest.aclose()
        raise as_api_error(first.error)
    return Call(reply, first, rest, info)


def _count(service: Service, request: GenerationRequest) -> int:
    engine = service.engine()
    engine.wait_loaded()
    return len(engine.encode(request))


async def count_prompt_tokens(state: ServerState, request: GenerationRequest,
                              model: ServedModel | None = None) -> int:
    """The prompt's length in tokens, made exactly as a generation makes it (engine.encode:
    the same chat template, tools and tokenizer). Runs in a worker thread, not on the engine
    thread, so a count never waits behind a long generation: the tokenizer and the template
    only read shared state."""
    try:
        service = state.pool.use(model or state.pool.default)
        return await run_in_threadpool(_count, service, request)
    except Exception as exc:
        raise as_api_error(exc) from None


def finish_reason(answer: Answer) -> str:
    # "cancelled" only reaches a client whose peers all left; to it the answer just ended.
    return "stop" if answer.finish_reason == "cancelled" else answer.finish_reason

"""One request pipeline for every API, and the adapter each API plugs into it.

    body (the API's pydantic model, parsed by a FastAPI dependency)
      -> adapter.prepare(): the canonical GenerationRequest (one cache key for every API)
      -> flow.start(): hit, join or generate, through the service
      -> adapter.render(): the answer as the API's JSON body
         or adapter.writer(): the events as the API's stream

An adapter holds everything that differs between APIs: the body model, the mapping to a
GenerationRequest, the answer's body and the stream's events (errors in a stream included);
its router's `dialect` dependency gives plain errors the API's shape. Adding a field to an
API is a change in its adapter only: read it in `prepare`, write it in `render` and in its
EventWriter (struct's logprobs on chat and completions are the example).
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Generic, TypeVar

from fastapi import Depends
from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxc.request import Answer, GenerationRequest
from mlxc.server import misses, sse
from mlxc.server.errors import ApiError, as_api_error, check_api_key, parse_body
from mlxc.server.flow import Call, start
from mlxc.server.model_pool import ServedModel
from mlxc.server.state import ServerState, get_state
from mlxc.stream import Delta, Failed, Finished

Body = TypeVar("Body", bound=BaseModel)


async def _state(request: Request) -> ServerState:
    return get_state(request)


# Every dependency here is async: FastAPI runs a sync one on its thread pool, and two or three
# thread hops per request were a third of a cache hit's time on a loaded 2-core CPU.
State = Annotated[ServerState, Depends(_state)]  # a route's shared state, by dependency


def dialect(name: str) -> Callable[[Request], Awaitable[None]]:
    """Router dependency: errors from these routes take this API's shape."""

    async def mark(request: Request) -> None:
        request.state.dialect = name

    return mark


async def authorized(request: Request, state: State) -> None:
    """Router dependency: the API key, when the server has one."""
    check_api_key(request, state.options.api_key)


def body_of(model: type[Body]) -> Callable[..., Any]:
    """Endpoint dependency: the bounded body as `model`, errors in the route's shape."""

    async def parse(request: Request, state: State) -> Body:
        return await parse_body(request, model, state.options.max_body_bytes)

    return parse


@dataclass(frozen=True)
class Prepared:
    """A body read and mapped: what an adapter answers from, the same for every repeat of
    the same bytes on the same route (so the fast path may keep it, server/fastpath.py)."""

    adapter: Adapter
    body: BaseModel
    model: str  # the name to echo back
    served: ServedModel
    request: GenerationRequest
    stream: bool


@dataclass
class Turn(Generic[Body]):
    """One request on its way: what an adapter needs to render its answer."""

    body: Body
    model: str  # the name to echo back: the client's own, aliases included
    request: GenerationRequest
    call: Call
    state: ServerState
    id: str
    created: int = field(default_factory=lambda: int(time.time()))
    extra: dict[str, Any] = field(default_factory=dict)  # an adapter's own per-request data


class EventWriter:
    """One stream's events in one API's shape; one instance per stream. The driver calls
    `opening` before anything, `first` on the first real event, `delta` per piece of text,
    `finish` with the answer, `failed` on an error, `closing` at the very end."""

    def __init__(self, adapter: Adapter, turn: Turn) -> None:
        self.adapter = adapter
        self.turn = turn

    def opening(self) -> Iterable[str]:
        return ()

    def first(self) -> Iterable[str]:
        return ()

    def delta(self, delta: Delta) -> Iterable[str]:
        return ()

    def finish(self, answer: Answer) -> Iterable[str]:
        return ()

    def failed(self, error: ApiError) -> Iterable[str]:
        return ()

    def closing(self) -> Iterable[str]:
        return ()

    def keepalive(self, started: bool) -> str:
        return sse.KEEPALIVE

    async def __call__(self) -> AsyncIterator[str]:
        started = False
        for chunk in self.opening():
            yield chunk
        async for event in self.turn.call.events():
            if event is None:
                yield self.keepalive(started)
                continue
            if not started:
                started = True
                for chunk in self.first():
                    yield chunk
            if isinstance(event, Delta):
                chunks = self.delta(event)
            elif isinstance(event, Finished):
                await self.adapter.completed(self.turn, event.answer)
                await misses.note(self.turn.state, self.turn.call.reply, self.turn.extra["route"])
                chunks = self.finish(event.answer)
            elif isinstance(event, Failed):
                chunks = self.failed(as_api_error(event.error))
            for chunk in chunks:
                yield chunk
        for chunk in self.closing():
            yield chunk


class Adapter(Generic[Body]):
    """One API dialect. Subclasses set `body_model`, `id_prefix`, `writer` and implement
    `prepare` and `render`."""

    id_prefix: ClassVar[str] = ""
    writer: ClassVar[type[EventWriter]] = EventWriter

    async def prepare(self, state: ServerState, body: Body) -> GenerationRequest:
        raise NotImplementedError

    def render(self, turn: Turn[Body], answer: Answer) -> dict[str, Any]:
        raise NotImplementedError

    async def completed(self, turn: Turn[Body], answer: Answer) -> None:
        """Called once the answer is whole, plain or streamed (Responses stores it here)."""

    def new_id(self) -> str:
        return f"{self.id_prefix}{os.urandom(16).hex()}"  # uuid4's length, at a third the cost

    async def __call__(self, state: ServerState, body: Body, request: Request) -> Response:
        """The pipeline: body -> GenerationRequest -> reply -> body or stream."""
        model, served = state.route(getattr(body, "model", None))
        generation_request = await self.prepare(state, body)
        prepared = Prepared(self, body, model, served, generation_request,
                            bool(getattr(body, "stream", False)))
        call = await start(state, generation_request, request, prepared.stream, served)
        request.state.prepared = prepared  # what a repeat of this body reuses (fastpath.py)
        return await self.respond(state, prepared, call, request)

    async def respond(self, state: ServerState, prepared: Prepared, call: Call,
                      request: Request) -> Response:
        """A started call as the API's body or stream (the fast path for repeated hits
        answers through here too, so both write the same bytes)."""
        turn = Turn(prepared.body, prepared.model, prepared.request, call, state, self.new_id())
        turn.extra["route"] = request.scope["path"]  # = url.path here, without building a URL
        if prepared.stream:
            headers = await _prefix_header(turn, call.reply.answer)
            return sse.EventStream(self.writer(self, turn)(), headers)
        answer = await call.answer(request)
        await self.completed(turn, answer)
        return JSONResponse(self.render(turn, answer), headers=await _prefix_header(turn, answer))


async def _prefix_header(turn: Turn, answer: Answer | None) -> dict[str, str]:
    """`X-Mlxc-Prefix`: how much of the prompt was reused, and where it parted
    (server/misses.py); a stored answer reused all of it."""
    if turn.call.reply.cached and answer is not None:
        return {misses.HEADER: misses.hit_header(answer.usage.prompt_tokens)}
    value = await misses.note(turn.state, turn.call.reply, turn.extra["route"])
    return {misses.HEADER: value} if value else {}


def refuse(param: str, message: str) -> ApiError:
    """A parameter this server cannot honour: a 400 that names it, never a silent ignore."""
    return ApiError(400, message, param=param, code="unsupported_parameter")


def check_fields(body: BaseModel, ignored: frozenset[str]) -> None:
    """Fields the body model does not declare are refused unless listed as not changing the
    output (`ignored`): an unknown field might, and the client should know it was not used."""
    for name in body.model_extra or {}:
        if name not in ignored:
            raise refuse(name, f"the parameter {name!r} is not supported by this server")

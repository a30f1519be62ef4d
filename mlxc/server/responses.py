"""OpenAI Responses API: POST /v1/responses (plain and streamed), GET and DELETE
/v1/responses/{id}. Codex CLI and the OpenAI Agents SDK speak it.

A Responses request becomes the same canonical GenerationRequest as the equivalent chat
request (instructions as the system message, items as messages, flat function tools in the
chat shape), so both share the response cache and the prefix cache. With `store` (the
default) each response is kept with its conversation, and `previous_response_id` continues
it; the instructions are not carried over, as OpenAI documents."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any, ClassVar

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxc.request import Answer, GenerationRequest
from mlxc.server import responses_items as items
from mlxc.server.errors import ApiError
from mlxc.server.flow import count_prompt_tokens
from mlxc.server.params import RESPONSES_IGNORED, tool_calls_for
from mlxc.server.pipeline import (
    Adapter,
    State,
    Turn,
    authorized,
    body_of,
    check_fields,
    dialect,
    refuse,
)
from mlxc.server.responses_stream import ResponsesWriter
from mlxc.server.state import ServerState

log = logging.getLogger("mlxc.server")
router = APIRouter(dependencies=[Depends(dialect("openai")), Depends(authorized)])


class ResponsesBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    text: dict[str, Any] | None = None
    # How hard a reasoning model thinks: these models do not reason, so every effort is met.
    reasoning: dict[str, Any] | None = None
    stream_options: dict[str, Any] | None = None  # include_obfuscation: no padding is sent
    top_logprobs: int | None = None


def _check(body: ResponsesBody) -> None:
    extra = body.model_extra or {}
    for name in ("background", "conversation", "prompt", "max_tool_calls", "context_management"):
        if extra.get(name):
            raise refuse(name, f"{name} is not supported by this server")
    if extra.get("truncation") not in (None, "disabled"):
        raise refuse("truncation", "only truncation 'disabled' is supported: a prompt that "
                      "is too long is an error, not cut")
    if body.top_logprobs:
        raise refuse("top_logprobs", "logprobs are not supported on the Responses API yet")
    if (body.text or {}).get("verbosity") not in (None, "medium"):
        raise refuse("text.verbosity", "only the default verbosity is supported")
    check_fields(body, RESPONSES_IGNORED | {"background", "conversation", "prompt",
                                            "max_tool_calls", "context_management"})


def _format(body: ResponsesBody) -> dict[str, Any] | None:
    """`text.format` as the canonical response_format (plain text is no format)."""
    fmt = (body.text or {}).get("format")
    return None if not fmt or fmt.get("type") == "text" else fmt


def tool_calls(turn: Turn, answer: Answer) -> list[dict[str, Any]]:
    """The answer's tool calls (honouring parallel_tool_calls), each with a call id."""
    base = turn.id.removeprefix("resp_")
    return [{**call, "id": call.get("id") or f"call_{base}_{i}"}
            for i, call in enumerate(tool_calls_for(turn, answer))]


def response_object(turn: Turn[ResponsesBody], answer: Answer | None,
                    status: str = "in_progress") -> dict[str, Any]:
    """The Response: in progress (answer None), or finished with its output and usage."""
    body = turn.body
    output, usage, incomplete = [], None, None
    if answer is not None:
        calls = tool_calls(turn, answer)
        output = items.output_items(answer, calls, turn.id.removeprefix("resp_"),
                                    items.namespaces(body.tools))
        cached = turn.call.cached_tokens(answer)
        prompt, completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
        usage = {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
                 "output_tokens": completion,
                 "output_tokens_details": {"reasoning_tokens": 0},
                 "total_tokens": prompt + completion}
        status = "incomplete" if answer.finish_reason == "length" else "completed"
        if status == "incomplete":
            incomplete = {"reason": "max_output_tokens"}
    return {
        "id": turn.id, "object": "response", "created_at": turn.created, "status": status,
        "error": None, "incomplete_details": incomplete, "instructions": body.instructions,
        "max_output_tokens": body.max_output_tokens, "model": turn.model, "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": {"effort": None, "summary": None}, "store": body.store,
        "temperature": turn.request.temperature, "top_p": turn.request.top_p,
        "text": {"format": _format(body) or {"type": "text"}},
        "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "truncation": "disabled", "usage": usage, "user": None,
        "metadata": (body.model_extra or {}).get("metadata") or {},
        "completed_at": int(time.time()) if status == "completed" else None,
    }


class ResponsesAdapter(Adapter[ResponsesBody]):
    id_prefix: ClassVar[str] = "resp_"
    writer = ResponsesWriter

    async def prepare(self, state: ServerState, body: ResponsesBody) -> GenerationRequest:
        _check(body)
        history: list[dict[str, Any]] = []
        if body.previous_response_id:
            stored = await run_in_threadpool(state.conversations.get, body.previous_response_id)
            if stored is None:
                raise ApiError(400, f"Previous response with id {body.previous_response_id!r} "
                               "not found.", param="previous_response_id",
                               code="previous_response_not_found")
            history = stored["messages"]
        messages = items.system_message(body.instructions) + history
        messages += items.input_messages(body.input)
        tool_choice = items.chat_tool_choice(body.tool_choice)
        # tool_choice "none": the model must not see the tools at all (as on chat).
        tools = None if tool_choice == "none" else items.chat_tools(body.tools)
        return state.generation_request(
            messages=messages, tools=tools, tool_choice=tool_choice,
            response_format=_format(body), max_tokens=body.max_output_tokens,
            temperature=body.temperature, top_p=body.top_p,
        )

    def render(self, turn: Turn[ResponsesBody], answer: Answer) -> dict[str, Any]:
        return response_object(turn, answer)

    # for the stream writer (responses_stream.py), which does not import this module
    response = staticmethod(response_object)
    calls = staticmethod(tool_calls)

    async def completed(self, turn: Turn[ResponsesBody], answer: Answer) -> None:
        """Keep the response and its conversation (instructions left out) for follow-ups."""
        if not turn.body.store or answer.finish_reason == "cancelled":
            return
        messages = [m.model_dump(exclude_none=True) for m in turn.request.messages]
        if items.system_message(turn.body.instructions):
            messages = messages[1:]
        messages.append(items.answer_message(answer, tool_calls(turn, answer)))
        value = {"response": response_object(turn, answer), "messages": messages}
        try:
            await run_in_threadpool(turn.state.conversations.set, turn.id, value)
        except Exception as exc:  # the answer still goes out; only a follow-up will miss it
            log.warning("responses: cannot store %s (%s)", turn.id, exc)


responses_adapter = ResponsesAdapter()
ResponsesRequest = Annotated[ResponsesBody, Depends(body_of(ResponsesBody))]


@router.post("/v1/responses")
async def create_response(request: Request, body: ResponsesRequest, state: State) -> Response:
    return await responses_adapter(state, body, request)


@router.post("/v1/responses/input_tokens")
async def count_input_tokens(body: ResponsesRequest, state: State) -> Response:
    """The prompt a create with this body would make, counted exactly (see count_tokens)."""
    _name, served = state.route(body.model)
    generation_request = await responses_adapter.prepare(state, body)
    tokens = await count_prompt_tokens(state, generation_request, served)
    return JSONResponse({"object": "response.input_tokens", "input_tokens": tokens})


async def _stored(state: ServerState, response_id: str) -> dict[str, Any]:
    stored = await run_in_threadpool(state.conversations.get, response_id)
    if stored is None:
        raise ApiError(404, f"Response with id {response_id!r} not found.", param="response_id",
                       code="not_found")
    return stored


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, state: State) -> Response:
    return JSONResponse((await _stored(state, response_id))["response"])


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, state: State) -> Response:
    await _stored(state, response_id)
    await run_in_threadpool(state.conversations.delete, response_id)
    return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})

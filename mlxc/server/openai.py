"""OpenAI-compatible routes: /v1/chat/completions, /v1/completions, /v1/models.

Request bodies allow (and ignore) the many optional fields real clients send; what changes
the output is mapped into the canonical GenerationRequest, so the key is shared with
`mlxc ask`, `cache warm` and the Anthropic route."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxc.request import Answer
from mlxc.server import sse
from mlxc.server.errors import ApiError, as_api_error, check_api_key
from mlxc.server.flow import Call, finish_reason, start, strip_billing_header
from mlxc.server.logprobs_format import chat_logprobs, completion_logprobs
from mlxc.server.state import get_state
from mlxc.stream import Delta, Failed, Finished

router = APIRouter()


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class Sampling(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1


class ChatBody(Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # how many alternatives per token (0: the token's own only)
    echo: bool = False


def _sampling(body: Sampling) -> dict[str, Any]:
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
    names = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "seed", "stop")
    return {name: getattr(body, name) for name in names}


def _messages(body: ChatBody) -> list[dict[str, Any]]:
    messages = []
    for i, m in enumerate(body.messages):
        role = "system" if m.role == "developer" else m.role
        content = m.content
        if i == 0 and role == "system" and isinstance(content, str):
            content = strip_billing_header(content)
        elif i == 0 and role == "system" and isinstance(content, list) and content:
            first = content[0]
            if first.get("type") == "text":
                text = strip_billing_header(str(first.get("text", "")))
                content = ([{**first, "text": text}] if text else []) + content[1:]
        message = {"role": role, "content": content, "name": m.name,
                   "tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id}
        messages.append({k: v for k, v in message.items() if v is not None})
    return messages


def _usage(call: Call, answer: Answer) -> dict[str, Any]:
    prompt, completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": call.cached_tokens(answer)},
    }


def _error_chunk(exc: BaseException) -> str:
    error = as_api_error(exc)
    return sse.data({"error": {"message": error.message, "type": "server_error",
                               "param": error.param, "code": error.code}})


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = get_state(request)
    body = await state.parse(request, ChatBody)
    model = state.check_model(body.model)
    # tool_choice "none": the model must not see the tools at all.
    tools = None if body.tool_choice == "none" else body.tools
    generation_request = state.generation_request(
        messages=_messages(body),
        tools=tools,
        tool_choice=body.tool_choice,
        response_format=body.response_format,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs,
        **_sampling(body),
    )
    call = await start(state, generation_request, request, body.stream)
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.EventStream(_chat_stream(call, model, usage))
    answer = await call.answer(request)
    message: dict[str, Any] = {"role": "assistant", "content": answer.text}
    if answer.tool_calls:
        message["tool_calls"] = answer.tool_calls
        message["content"] = answer.text or None
    return JSONResponse({
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(answer.logprobs),
                     "finish_reason": finish_reason(answer)}],
        "usage": _usage(call, answer),
    })


async def _chat_stream(call: Call, model: str, include_usage: bool) -> AsyncIterator[str]:
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model}
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": chat_logprobs(logprobs),
                  "finish_reason": finish}
        return sse.data({**head, "choices": [choice], **extra})

    yield chunk({"role": "assistant", "content": ""})
    async for event in call.events():
        if event is None:
            yield sse.KEEPALIVE
        elif isinstance(event, Delta):
            yield chunk({"content": event.text}, logprobs=event.logprobs)
        elif isinstance(event, Finished):
            answer = event.answer
            for i, tool_call in enumerate(answer.tool_calls):
                yield chunk({"tool_calls": [{"index": i, **tool_call}]})
            yield chunk({}, finish_reason(answer))
            if include_usage:
                yield sse.data({**head, "choices": [], "usage": _usage(call, answer)})
        elif isinstance(event, Failed):
            yield _error_chunk(event.error)
    yield sse.DONE


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = get_state(request)
    body = await state.parse(request, CompletionBody)
    model = state.check_model(body.model)
    prompt = body.prompt
    if isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "give one prompt (batches are not supported)", param="prompt")
        prompt = prompt[0]
    if body.echo and body.stream:
        raise ApiError(400, "echo is not supported with stream", param="echo")
    top = body.logprobs or 0
    generation_request = state.generation_request(
        prompt=prompt, max_tokens=body.max_tokens, logprobs=body.logprobs is not None,
        top_logprobs=top, echo=body.echo or None, **_sampling(body)
    )
    call = await start(state, generation_request, request, body.stream)
    head = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": model}
    if body.stream:
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse.EventStream(_completion_stream(call, head, usage, top))
    answer = await call.answer(request)
    text, entries = answer.text, answer.logprobs
    if body.echo:
        echoed = answer.prompt_logprobs or []
        text = (prompt if isinstance(prompt, str) else "".join(e["token"] for e in echoed)) + text
        entries = echoed + (entries or []) if body.logprobs is not None else None
    choice = {"index": 0, "text": text, "logprobs": completion_logprobs(entries, top),
              "finish_reason": finish_reason(answer)}
    return JSONResponse({**head, "choices": [choice], "usage": _usage(call, answer)})


async def _completion_stream(
    call: Call, head: dict, include_usage: bool, top: int
) -> AsyncIterator[str]:
    offset = 0

    def chunk(text: str, finish: str | None = None, logprobs=None) -> str:
        nonlocal offset
        shaped = completion_logprobs(logprobs, top, offset)
        offset += len(text)
        choice = {"index": 0, "text": text, "logprobs": shaped, "finish_reason": finish}
        return sse.data({**head, "choices": [choice]})

    async for event in call.events():
        if event is None:
            yield sse.KEEPALIVE
        elif isinstance(event, Delta):
            yield chunk(event.text, logprobs=event.logprobs)
        elif isinstance(event, Finished):
            yield chunk("", finish_reason(event.answer))
            if include_usage:
                yield sse.data({**head, "choices": [], "usage": _usage(call, event.answer)})
        elif isinstance(event, Failed):
            yield _error_chunk(event.error)
    yield sse.DONE


@router.get("/v1/models")
async def list_models(request: Request) -> Response:
    state = get_state(request)
    check_api_key(request, state.options.api_key)
    return JSONResponse({"object": "list", "data": [_model(state, n) for n in _listed(state)]})


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request) -> Response:
    state = get_state(request)
    check_api_key(request, state.options.api_key)
    return JSONResponse(_model(state, state.check_model(name)))


def _listed(state) -> list[str]:
    return [state.model_id, *(a for a in state.options.aliases if not set(a) & set("*?["))]


def _model(state, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(state.started), "owned_by": "mlxc"}

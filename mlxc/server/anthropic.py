"""Anthropic Messages API: POST /v1/messages, plain and streamed.

Anthropic's shapes are mapped onto the same canonical request as OpenAI's: system blocks
become one system message, tool_use blocks assistant tool calls, tool_result blocks tool
messages, tools OpenAI-style functions. So a question asked through either API, or with
`mlxc ask`, has one cache key."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import APIRouter
from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxc.request import Answer
from mlxc.server import sse
from mlxc.server.errors import ApiError, as_api_error
from mlxc.server.flow import Call, start, without_billing_blocks
from mlxc.server.state import get_state
from mlxc.stream import Delta, Failed, Finished

router = APIRouter()

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "cancelled": "end_turn"}


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class InputMessage(_Body):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class Tool(_Body):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=dict)


class MessagesBody(_Body):
    model: str
    messages: list[InputMessage]
    max_tokens: int
    system: str | list[TextBlock] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[Tool] | None = None
    tool_choice: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # its `format`: a JSON schema for the answer


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type") == "text")


def _messages(body: MessagesBody) -> list[dict[str, Any]]:
    """Anthropic messages -> canonical (OpenAI-like) messages."""
    out: list[dict[str, Any]] = []
    if body.system:
        blocks = [body.system] if isinstance(body.system, str) else [b.text for b in body.system]
        if system := "\n\n".join(without_billing_blocks(blocks)):
            out.append({"role": "system", "content": system})
    for i, message in enumerate(body.messages):
        blocks = message.content
        if isinstance(blocks, str):
            out.append({"role": message.role, "content": blocks})
            continue
        texts, calls = [], []
        for block in blocks:
            kind = block.get("type")
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "tool_use" and message.role == "assistant":
                arguments = json.dumps(block.get("input", {}), ensure_ascii=False, sort_keys=True)
                calls.append({"id": block.get("id"), "type": "function",
                              "function": {"name": block.get("name"), "arguments": arguments}})
            elif kind == "tool_result" and message.role == "user":
                result = block.get("content", "")
                out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"),
                            "content": _text(result) if isinstance(result, list) else str(result)})
            elif kind in ("thinking", "redacted_thinking"):
                continue  # earlier reasoning is not replayed to the model
            else:
                raise ApiError(400, f"messages.{i}: content blocks of type {kind!r} are not "
                               "supported (text, tool_use and tool_result are)")
        if texts or calls:
            entry: dict[str, Any] = {"role": message.role, "content": "".join(texts)}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
    return out


def _tools(body: MessagesBody) -> list[dict[str, Any]] | None:
    if not body.tools or (body.tool_choice or {}).get("type") == "none":
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema}} for t in body.tools]


def _usage(call: Call, answer: Answer) -> dict[str, int]:
    # Anthropic counts cache reads apart from input_tokens.
    cached = call.cached_tokens(answer)
    return {"input_tokens": answer.usage.prompt_tokens - cached,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": answer.usage.completion_tokens}


def _tool_blocks(answer: Answer) -> list[dict[str, Any]]:
    blocks = []
    for call in answer.tool_calls:
        function = call.get("function", {})
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {"_raw": function.get("arguments")}
        blocks.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                       "name": function.get("name"), "input": arguments})
    return blocks


@router.post("/v1/messages")
async def messages(request: Request) -> Response:
    state = get_state(request)
    body = await state.parse(request, MessagesBody)
    model = state.check_model(body.model)
    generation_request = state.generation_request(
        messages=_messages(body),
        tools=_tools(body),
        tool_choice=body.tool_choice,
        response_format=(body.output_config or {}).get("format"),
        max_tokens=body.max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        stop=body.stop_sequences,
    )
    call = await start(state, generation_request, request, body.stream)
    message_id = f"msg_{uuid.uuid4().hex}"
    if body.stream:
        return sse.EventStream(_stream(call, message_id, model))
    answer = await call.answer(request)
    content = ([{"type": "text", "text": answer.text}] if answer.text or not answer.tool_calls
               else []) + _tool_blocks(answer)
    return JSONResponse({
        "id": message_id, "type": "message", "role": "assistant", "model": model,
        "content": content, "stop_reason": STOP_REASONS[answer.finish_reason],
        "stop_sequence": None, "usage": _usage(call, answer),
    })


async def _stream(call: Call, message_id: str, model: str) -> AsyncIterator[str]:
    """message_start, ping, one text block of deltas, tool_use blocks, message_delta,
    message_stop. message_start waits for the first event (comments keep the line alive
    until then) so that a hit can report its usage."""
    started = text_open = False
    index = 0
    async for event in call.events():
        if event is None:
            yield sse.event("ping", {"type": "ping"}) if started else sse.KEEPALIVE
            continue
        if not started:
            started = True
            prompt = call.reply.answer.usage.prompt_tokens if call.reply.answer else 0
            usage = {"input_tokens": 0 if call.reply.cached else prompt, "output_tokens": 0,
                     "cache_read_input_tokens": prompt if call.reply.cached else 0}
            yield sse.event("message_start", {"type": "message_start", "message": {
                "id": message_id, "type": "message", "role": "assistant", "model": model,
                "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}})
            yield sse.event("ping", {"type": "ping"})
        if isinstance(event, Delta):
            if not text_open:
                text_open = True
                yield _text_block_start()
            yield sse.event("content_block_delta", {"type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": event.text}})
        elif isinstance(event, Finished):
            if not text_open and not event.answer.tool_calls:
                text_open = True  # an empty answer still has its (empty) text block
                yield _text_block_start()
            if text_open:
                yield sse.event("content_block_stop", {"type": "content_block_stop", "index": 0})
                index = 1
            for block in _tool_blocks(event.answer):
                partial = json.dumps(block["input"], ensure_ascii=False)
                yield sse.event("content_block_start", {"type": "content_block_start",
                                "index": index, "content_block": {**block, "input": {}}})
                yield sse.event("content_block_delta", {"type": "content_block_delta",
                                "index": index,
                                "delta": {"type": "input_json_delta", "partial_json": partial}})
                yield sse.event("content_block_stop", {"type": "content_block_stop",
                                                       "index": index})
                index += 1
            yield sse.event("message_delta", {"type": "message_delta", "delta": {
                "stop_reason": STOP_REASONS[event.answer.finish_reason], "stop_sequence": None},
                "usage": _usage(call, event.answer)})
            yield sse.event("message_stop", {"type": "message_stop"})
        elif isinstance(event, Failed):
            error = as_api_error(event.error)
            yield sse.event("error", {"type": "error", "error": {
                "type": "api_error" if error.status >= 500 else "invalid_request_error",
                "message": error.message}})


def _text_block_start() -> str:
    return sse.event("content_block_start", {"type": "content_block_start", "index": 0,
                                             "content_block": {"type": "text", "text": ""}})

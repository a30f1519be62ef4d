"""Anthropic Messages API: POST /v1/messages (plain and streamed) and its token counter.

Anthropic's shapes are mapped onto the same canonical request as OpenAI's: system blocks
(and system messages inside `messages`) become one system message, tool_use blocks assistant
tool calls, tool_result blocks tool messages, tools OpenAI-style functions. So a question
asked through either API, or with `mlxc ask`, has one cache key."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxc.request import Answer, GenerationRequest
from mlxc.server import sse
from mlxc.server.errors import ApiError
from mlxc.server.flow import count_prompt_tokens, without_billing_blocks
from mlxc.server.params import ANTHROPIC_IGNORED, check_anthropic, tool_calls_for
from mlxc.server.pipeline import (
    Adapter,
    EventWriter,
    State,
    Turn,
    authorized,
    body_of,
    check_fields,
    dialect,
)
from mlxc.server.state import ServerState
from mlxc.shapes import check_anthropic_content
from mlxc.stream import Delta

router = APIRouter(dependencies=[Depends(dialect("anthropic")), Depends(authorized)])

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use",
                "cancelled": "end_turn"}
# Fields checked by check_anthropic, then accepted.
_CHECKED = frozenset({"container", "mcp_servers", "compaction", "context_management"})


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class TextBlock(_Body):
    type: Literal["text"]
    text: str


class InputMessage(_Body):
    role: Literal["user", "assistant", "system"]
    content: str | list[dict[str, Any]]

    @field_validator("content", mode="before")
    @classmethod
    def _blocks_shape(cls, value: Any) -> Any:  # wrong types: a 400, not a 500 (harden)
        return check_anthropic_content(value) if isinstance(value, list) else value


class Tool(_Body):
    name: str
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=dict)


class PromptBody(_Body):
    """What the prompt is made of: shared by messages and count_tokens."""

    model: str
    messages: list[InputMessage]
    system: str | list[TextBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: dict[str, Any] | None = None
    # These models do not think: any budget is met by not thinking (thinking blocks of
    # earlier turns are not replayed to the model either).
    thinking: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None  # its `format`: a JSON schema for the answer


class MessagesBody(PromptBody):
    max_tokens: int
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False


def _stop_reason(answer: Answer) -> str:
    return "stop_sequence" if answer.stop_sequence else STOP_REASONS[answer.finish_reason]


def _text(content: str | list[dict[str, Any]]) -> str:
    if isinstance(content, str):
        return content
    return "".join(b.get("text", "") for b in content if b.get("type") == "text")


def _messages(body: PromptBody) -> list[dict[str, Any]]:
    """Anthropic messages -> canonical (OpenAI-like) messages."""
    systems = [body.system] if isinstance(body.system, str) else [b.text for b in body.system or []]
    turns = list(body.messages)
    while turns and turns[0].role == "system":  # leading system messages join the system prompt
        systems.append(_text(turns.pop(0).content))
    out: list[dict[str, Any]] = []
    if system := "\n\n".join(without_billing_blocks(systems)):
        out.append({"role": "system", "content": system})
    for i, message in enumerate(turns):
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


def _tools(body: PromptBody) -> list[dict[str, Any]] | None:
    if not body.tools or (body.tool_choice or {}).get("type") == "none":
        return None
    return [{"type": "function", "function": {"name": t.name, "description": t.description or "",
                                              "parameters": t.input_schema}} for t in body.tools]


def _usage(turn: Turn, answer: Answer) -> dict[str, int]:
    # Anthropic counts cache reads apart from input_tokens. Nothing is reported as cache
    # creation: mlxc's prefix cache keeps every prompt by itself, at no extra cost.
    cached = turn.call.cached_tokens(answer)
    return {"input_tokens": answer.usage.prompt_tokens - cached,
            "cache_creation_input_tokens": 0, "cache_read_input_tokens": cached,
            "output_tokens": answer.usage.completion_tokens}


def _opening_usage(turn: Turn) -> dict[str, int]:
    """message_start's usage: on a hit the stored answer's, on a miss what the engine
    published before prefill (the prompt and the part the prefix cache held)."""
    reply = turn.call.reply
    if reply.answer is not None:
        prompt, cached = reply.answer.usage.prompt_tokens, reply.answer.usage.prompt_tokens
    else:
        prompt, cached = reply.generation.prompt_tokens, reply.generation.reused_tokens
    return {"input_tokens": prompt - cached, "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached, "output_tokens": 0}


def _tool_blocks(turn: Turn, answer: Answer) -> list[dict[str, Any]]:
    blocks = []
    for call in tool_calls_for(turn, answer):
        function = call.get("function", {})
        try:
            arguments = json.loads(function.get("arguments") or "{}")
        except ValueError:
            arguments = {"_raw": function.get("arguments")}
        blocks.append({"type": "tool_use", "id": call.get("id") or f"toolu_{uuid.uuid4().hex}",
                       "name": function.get("name"), "input": arguments})
    return blocks


def _prompt_request(state: ServerState, body: PromptBody, **fields: Any) -> GenerationRequest:
    check_anthropic(body)
    check_fields(body, ANTHROPIC_IGNORED | _CHECKED)
    return state.generation_request(
        messages=_messages(body), tools=_tools(body), tool_choice=body.tool_choice,
        response_format=(body.output_config or {}).get("format"), **fields)


class MessagesWriter(EventWriter):
    """message_start, ping, one text block of deltas, tool_use blocks, message_delta,
    message_stop. message_start waits for the first event (comments keep the line alive
    until then) so that its usage is known."""

    text_open = False

    def keepalive(self, started: bool) -> str:
        return sse.event("ping", {"type": "ping"}) if started else sse.KEEPALIVE

    def first(self) -> Iterable[str]:
        turn = self.turn
        yield sse.event("message_start", {"type": "message_start", "message": {
            "id": turn.id, "type": "message", "role": "assistant", "model": turn.model,
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": _opening_usage(turn)}})
        yield sse.event("ping", {"type": "ping"})

    def _open_text(self) -> Iterable[str]:
        if not self.text_open:
            self.text_open = True
            yield sse.event("content_block_start", {"type": "content_block_start", "index": 0,
                                                    "content_block": {"type": "text", "text": ""}})

    def delta(self, delta: Delta) -> Iterable[str]:
        yield from self._open_text()
        text = {"type": "text_delta", "text": delta.text}
        yield sse.event("content_block_delta",
                        {"type": "content_block_delta", "index": 0, "delta": text})

    def finish(self, answer: Answer) -> Iterable[str]:
        if not answer.tool_calls:
            yield from self._open_text()  # an empty answer still has its (empty) text block
        index = 0
        if self.text_open:
            yield sse.event("content_block_stop", {"type": "content_block_stop", "index": 0})
            index = 1
        for block in _tool_blocks(self.turn, answer):
            partial = json.dumps(block["input"], ensure_ascii=False)
            yield sse.event("content_block_start", {"type": "content_block_start",
                            "index": index, "content_block": {**block, "input": {}}})
            yield sse.event("content_block_delta", {"type": "content_block_delta", "index": index,
                            "delta": {"type": "input_json_delta", "partial_json": partial}})
            yield sse.event("content_block_stop", {"type": "content_block_stop", "index": index})
            index += 1
        yield sse.event("message_delta", {"type": "message_delta", "delta": {
            "stop_reason": _stop_reason(answer), "stop_sequence": answer.stop_sequence},
            "usage": _usage(self.turn, answer)})
        yield sse.event("message_stop", {"type": "message_stop"})

    def failed(self, error: ApiError) -> Iterable[str]:
        kind = "api_error" if error.status >= 500 else "invalid_request_error"
        yield sse.event("error", {"type": "error",
                                  "error": {"type": kind, "message": error.message}})


class MessagesAdapter(Adapter[MessagesBody]):
    id_prefix: ClassVar[str] = "msg_"
    writer = MessagesWriter

    async def prepare(self, state: ServerState, body: MessagesBody) -> GenerationRequest:
        return _prompt_request(state, body, max_tokens=body.max_tokens,
                               temperature=body.temperature, top_p=body.top_p,
                               top_k=body.top_k, stop=body.stop_sequences)

    def render(self, turn: Turn[MessagesBody], answer: Answer) -> dict[str, Any]:
        said = answer.text or not answer.tool_calls
        text = [{"type": "text", "text": answer.text}] if said else []
        return {
            "id": turn.id, "type": "message", "role": "assistant", "model": turn.model,
            "content": text + _tool_blocks(turn, answer),
            "stop_reason": _stop_reason(answer),
            "stop_sequence": answer.stop_sequence, "usage": _usage(turn, answer),
        }


messages_adapter = MessagesAdapter()
MessagesRequest = Annotated[MessagesBody, Depends(body_of(MessagesBody))]
PromptRequest = Annotated[PromptBody, Depends(body_of(PromptBody))]


@router.post("/v1/messages")
async def messages(request: Request, body: MessagesRequest, state: State) -> Response:
    return await messages_adapter(state, body, request)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: PromptRequest, state: State) -> Response:
    _name, served = state.route(body.model)
    generation_request = _prompt_request(state, body)
    tokens = await count_prompt_tokens(state, generation_request, served)
    return JSONResponse({"input_tokens": tokens})

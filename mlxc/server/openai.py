"""OpenAI chat completions and completions: their adapters and routes.

What changes the output is mapped into the canonical GenerationRequest, so the key is shared
with `mlxc ask`, `cache warm`, the Responses route and the Anthropic route. What cannot be
honoured is refused with a 400 naming the parameter (see `params.py`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict
from starlette.requests import Request
from starlette.responses import Response

from mlxc.request import Answer, GenerationRequest
from mlxc.server import sse
from mlxc.server.errors import ApiError
from mlxc.server.flow import finish_reason, strip_billing_header
from mlxc.server.logprobs_format import chat_logprobs, completion_logprobs
from mlxc.server.params import OPENAI_IGNORED, check_openai_sampling, tool_calls_for
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
from mlxc.server.prediction import check_prediction, prediction_text, prediction_usage
from mlxc.server.state import ServerState
from mlxc.stream import Delta

router = APIRouter(dependencies=[Depends(dialect("openai")), Depends(authorized)])
# OpenAI's default for /v1/completions (chat's is the model's own limit: mlxc's 512). Filled
# in before the request is keyed, so leaving it out and sending 16 share one cache entry.
COMPLETION_MAX_TOKENS = 16


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class StreamOptions(_Body):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # padding against length side channels: none sent


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
    n: int | None = None
    logit_bias: dict[str, float] | None = None
    ignore_eos: bool | None = None  # vLLM extension (benchmark clients): decode to max_tokens

    def sampling(self) -> dict[str, Any]:
        names = ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "seed", "stop", "ignore_eos")
        return {name: getattr(self, name) for name in names}

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatBody(Sampling):
    messages: list[ChatMessage]
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    prediction: Any = None  # Predicted Outputs: server/prediction.py


class CompletionBody(Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = None  # how many alternatives per token (0: the token's own only)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """OpenAI messages -> canonical messages (developer is system; Claude Code's billing
    line, which changes on every request, is cut from an opening system message)."""
    out = []
    for i, m in enumerate(messages):
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
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def usage(turn: Turn, answer: Answer) -> dict[str, Any]:
    prompt, completion = answer.usage.prompt_tokens, answer.usage.completion_tokens
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": turn.call.cached_tokens(answer)},
        **(prediction_usage(turn, answer) if turn.request.prediction is not None else {}),
    }


def error_chunk(error: ApiError) -> str:
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    return sse.data({"error": {"message": error.message, "type": kind,
                               "param": error.param, "code": error.code}})


class OpenAIWriter(EventWriter):
    """What both OpenAI streams end with: the usage chunk (if asked), errors, `[DONE]`."""

    def usage_tail(self, answer: Answer) -> Iterable[str]:
        if self.turn.body.include_usage:
            yield sse.data({**self.head, "choices": [], "usage": usage(self.turn, answer)})

    def failed(self, error: ApiError) -> Iterable[str]:
        yield error_chunk(error)

    def closing(self) -> Iterable[str]:
        yield sse.DONE


class ChatWriter(OpenAIWriter):
    def opening(self) -> Iterable[str]:
        turn = self.turn
        self.head = {"id": turn.id, "object": "chat.completion.chunk",
                     "created": turn.created, "model": turn.model}
        self.extra = {"usage": None} if turn.body.include_usage else {}
        yield self.chunk({"role": "assistant", "content": ""})

    def chunk(self, delta: dict[str, Any], finish: str | None = None, logprobs=None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": chat_logprobs(logprobs),
                  "finish_reason": finish}
        return sse.data({**self.head, "choices": [choice], **self.extra})

    def delta(self, delta: Delta) -> Iterable[str]:
        yield self.chunk({"content": delta.text}, logprobs=delta.logprobs)

    def finish(self, answer: Answer) -> Iterable[str]:
        for i, call in enumerate(tool_calls_for(self.turn, answer)):
            yield self.chunk({"tool_calls": [{"index": i, **call}]})
        yield self.chunk({}, finish_reason(answer))
        yield from self.usage_tail(answer)


class ChatAdapter(Adapter[ChatBody]):
    id_prefix: ClassVar[str] = "chatcmpl-"
    writer = ChatWriter

    async def prepare(self, state: ServerState, body: ChatBody) -> GenerationRequest:
        check_fields(body, OPENAI_IGNORED)
        check_openai_sampling(body)
        # tool_choice "none": the model must not see the tools at all.
        tools = None if body.tool_choice == "none" else body.tools
        request = state.generation_request(
            messages=chat_messages(body.messages),
            tools=tools,
            tool_choice=body.tool_choice,
            response_format=body.response_format,
            max_tokens=_first_given(body.max_completion_tokens, body.max_tokens),
            logprobs=body.logprobs,
            top_logprobs=body.top_logprobs,
            prediction=prediction_text(body),
            **body.sampling(),
        )
        check_prediction(request, state.service.settings.speculate)
        return request

    def render(self, turn: Turn[ChatBody], answer: Answer) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": answer.text}
        if calls := tool_calls_for(turn, answer):
            message["tool_calls"] = calls
            message["content"] = answer.text or None
        return {
            "id": turn.id, "object": "chat.completion", "created": turn.created,
            "model": turn.model,
            "choices": [{"index": 0, "message": message,
                         "logprobs": chat_logprobs(answer.logprobs),
                         "finish_reason": finish_reason(answer)}],
            "usage": usage(turn, answer),
        }


class CompletionWriter(OpenAIWriter):
    def opening(self) -> Iterable[str]:
        turn = self.turn
        self.head = {"id": turn.id, "object": "text_completion", "created": turn.created,
                     "model": turn.model}
        self.top = turn.body.logprobs or 0
        self.offset = 0  # text_offset of the next token
        return ()

    def chunk(self, text: str, finish: str | None = None, logprobs=None) -> str:
        shaped = completion_logprobs(logprobs, self.top, self.offset)
        self.offset += len(text)
        choice = {"index": 0, "text": text, "logprobs": shaped, "finish_reason": finish}
        return sse.data({**self.head, "choices": [choice]})

    def delta(self, delta: Delta) -> Iterable[str]:
        yield self.chunk(delta.text, logprobs=delta.logprobs)

    def finish(self, answer: Answer) -> Iterable[str]:
        yield self.chunk("", finish_reason(answer))
        yield from self.usage_tail(answer)


class CompletionAdapter(Adapter[CompletionBody]):
    id_prefix: ClassVar[str] = "cmpl-"
    writer = CompletionWriter

    async def prepare(self, state: ServerState, body: CompletionBody) -> GenerationRequest:
        check_fields(body, OPENAI_IGNORED)
        check_openai_sampling(body)
        if body.echo and body.stream:
            raise ApiError(400, "echo is not supported with stream", param="echo")
        return state.generation_request(
            prompt=_one_prompt(body), max_tokens=_first_given(body.max_tokens,
                                                              COMPLETION_MAX_TOKENS),
            logprobs=body.logprobs is not None, top_logprobs=body.logprobs or 0,
            echo=body.echo or None, **body.sampling())

    def render(self, turn: Turn[CompletionBody], answer: Answer) -> dict[str, Any]:
        body = turn.body
        text, entries = answer.text, answer.logprobs
        if body.echo:
            echoed = answer.prompt_logprobs or []
            prompt = _one_prompt(body)
            said = prompt if isinstance(prompt, str) else "".join(e["token"] for e in echoed)
            text = said + text
            entries = echoed + (entries or []) if body.logprobs is not None else None
        choice = {"index": 0, "text": text,
                  "logprobs": completion_logprobs(entries, body.logprobs or 0),
                  "finish_reason": finish_reason(answer)}
        return {"id": turn.id, "object": "text_completion", "created": turn.created,
                "model": turn.model, "choices": [choice], "usage": usage(turn, answer)}


def _one_prompt(body: CompletionBody) -> str | list[int]:
    """The prompt: text or token ids; a list of several prompts is refused."""
    prompt = body.prompt
    if isinstance(prompt, list) and not all(isinstance(t, int) for t in prompt):
        if len(prompt) != 1:
            raise ApiError(400, "give one prompt (batches are not supported)", param="prompt")
        prompt = prompt[0]
    return prompt


chat = ChatAdapter()
completion = CompletionAdapter()
ChatRequest = Annotated[ChatBody, Depends(body_of(ChatBody))]
CompletionRequest = Annotated[CompletionBody, Depends(body_of(CompletionBody))]


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, body: ChatRequest, state: State) -> Response:
    return await chat(state, body, request)


@router.post("/v1/completions")
async def completions(request: Request, body: CompletionRequest, state: State) -> Response:
    return await completion(state, body, request)


def _first_given(*values: Any) -> Any:
    """The first value that is not None: 0 is a value (refused or honoured), not absence."""
    return next((v for v in values if v is not None), None)

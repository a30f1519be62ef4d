"""The canonical generation request, its cache key, and the stored answer. No MLX here.

Every front end (ask, serve, warm, bench) builds a `GenerationRequest`; defaults are filled
in by the model itself, so two requests that generate the same way hash the same way.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mlxc.request_key import cache_key, canonical_json
from mlxc.shapes import check_text_part, check_tool_calls, check_tools

DEFAULT_MAX_TOKENS = 512
MAX_TOKENS_LIMIT = 32768


class Message(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, value: Any) -> Any:
        # OpenAI/Anthropic content may be a list of parts; only text reaches the model.
        if isinstance(value, list):
            texts = []
            for part in value:
                if not isinstance(part, dict) or part.get("type") not in ("text", "input_text"):
                    raise ValueError("only text content parts are supported")
                texts.append(check_text_part(part, "content part"))
            return "".join(texts)
        return value

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls_shape(cls, value: Any) -> Any:
        return check_tool_calls(value)


class GenerationRequest(BaseModel):
    """Everything that changes the output of a generation, with defaults filled in."""

    model_config = ConfigDict(extra="forbid")

    messages: list[Message] | None = None
    prompt: str | list[int] | None = None  # raw completion (text or token ids): no template
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    max_tokens: int = Field(DEFAULT_MAX_TOKENS, ge=0, le=MAX_TOKENS_LIMIT)  # 0: echo only
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**64 - 1)  # what mx.random.seed takes
    stop: list[str] = Field(default_factory=list)
    # Log-probabilities of the answer's tokens (and of the prompt's, with echo). Left out of
    # the key at their defaults, so keys from before they existed stay the same.
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=20)
    echo: bool = False
    # vLLM's extension (sent by guidellm, genai-perf, llmperf): decode to max_tokens, past the
    # model's end tokens; stop strings still stop. Keyed only when set, as the three above.
    ignore_eos: bool = False
    # OpenAI's Predicted Output: what most of the answer will be, a draft source for
    # speculative decoding. It cannot change the answer, so it is in no key (not dumped).
    prediction: str | None = Field(None, exclude=True)

    @field_validator("tools")
    @classmethod
    def _tools_shape(cls, value: Any) -> Any:
        return check_tools(value)

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _one_input(self) -> GenerationRequest:
        if (self.messages is None) == (self.prompt is None):
            raise ValueError("give either messages or prompt")
        if self.messages is not None:
            if not self.messages:
                raise ValueError("messages must not be empty")
            if not any((m.content or "").strip() or m.tool_calls for m in self.messages):
                raise ValueError("the prompt is empty")
        elif not (self.prompt.strip() if isinstance(self.prompt, str) else self.prompt):
            raise ValueError("the prompt is empty")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs")
        if self.echo and self.prompt is None:
            raise ValueError("echo needs a prompt (completions), not messages")
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens must be at least 1 (0 only with echo)")
        if self.response_format or self.tool_choice not in (None, "auto", "none"):
            from mlxc.engine.decode.constraints import grammar_for  # llguidance: only when asked

            grammar = grammar_for(self.response_format, self.tools, self.tool_choice)  # refuses
            if grammar and self.ignore_eos:  # a finished grammar allows nothing but an end token
                raise ValueError("ignore_eos cannot be used with a structured output or a "
                                 "forced tool call: the grammar ends the answer")
        return self

    @property
    def is_deterministic(self) -> bool:
        """Greedy, or sampled with a fixed seed: the same request gives the same answer."""
        return self.temperature == 0.0 or self.seed is not None

    def canonical_json(self, model_fingerprint: str) -> str:
        return canonical_json(self.model_dump(mode="json"), model_fingerprint)

    def cache_key(self, model_fingerprint: str) -> str:
        """SHA-256 of the canonical request: equal in every process and on every machine."""
        return cache_key(self.model_dump(mode="json"), model_fingerprint)


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens whose KV state was reused, not recomputed
    # Speculative decoding (engine/decode/speculate.py): draft tokens verified and taken; of
    # a Predicted Output's, those taken and those drafted but not taken.
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    accepted_prediction_tokens: int = 0
    rejected_prediction_tokens: int = 0


class Answer(BaseModel):
    """A finished generation: what the response store keeps and a hit returns verbatim."""

    text: str
    finish_reason: Literal["stop", "length", "tool_calls", "cancelled"] = "stop"
    stop_sequence: str | None = None  # which of the request's stop strings ended the text
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)
    usage: Usage = Field(default_factory=Usage)
    # Per token: {"id", "token", "bytes", "logprob", "top_logprobs": [...]} (decode/logprobs.py).
    logprobs: list[dict[str, Any]] | None = None
    prompt_logprobs: list[dict[str, Any]] | None = None  # with echo; the first has logprob None
    model: str = ""
    prefill_seconds: float = 0.0
    generation_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        n = self.usage.completion_tokens
        return n / self.generation_seconds if self.generation_seconds > 0 else 0.0

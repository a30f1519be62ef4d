"""One sequence in the engine's batch: what a lone request kept in local variables, named.

A `Sequence` is made when its request is admitted (prompt encoded, prefix state fetched,
sampler built) and lives until its answer is published. It turns each sampled token into
published text: detokenizing, stop strings, the tool-call filter, log-probabilities. Engine
thread only, except `generation`, which is thread-safe.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from mlxc.engine.decode.generate import Prefill
from mlxc.engine.decode.sampling import SequenceSampling
from mlxc.engine.decode.tools import ForcedCall, ToolCallFilter
from mlxc.request import Answer, GenerationRequest, Usage
from mlxc.stream import Delta, Generation


@dataclass
class Sequence:
    request: GenerationRequest
    generation: Generation
    prompt: list[int]  # every prompt token
    reused: int  # how many of them are already in `cache` (not prefilled)
    cached: int  # how many came from a prefix cache tier (the usage figure)
    sampling: SequenceSampling
    stops: ToolCallFilter | ForcedCall
    detokenizer: Any
    eos: set[int]
    prefill: Prefill  # feeds the rest of the prompt, then samples the first token
    cache: list[Any]  # the sequence's own state while it prefills; the batch holds it after
    started: float = field(default_factory=time.perf_counter)
    uid: int | None = None  # its id in the BatchGenerator, once decoding there
    generated: list[int] = field(default_factory=list)  # answer tokens (no end token)
    taken: list[int] = field(default_factory=list)  # every sampled token, an end token too
    parts: list[str] = field(default_factory=list)  # the text published so far
    first_token_at: float | None = None
    finish: str | None = None  # set once the sequence is done: stop, length, cancelled
    prompt_logprobs: list[dict] | None = None  # with echo: the prompt's own log-probabilities
    speculate: str = "off"  # --speculate; "off" once it is found unable to (decode/speculate.py)
    prediction: list[int] | None = None  # a Predicted Output's tokens: a draft source
    drafter: Any = None  # its Drafter, once it speculates

    @property
    def said(self) -> list[int]:
        """Prompt and answer tokens: the prefix state's key once it is done."""
        return self.prompt + self.generated

    def tail(self, n: int = 4) -> list[int]:
        """The last `n` tokens of prompt and taken, without joining the whole lists."""
        return (self.prompt[-n:] + self.taken)[-n:] if len(self.taken) < n else self.taken[-n:]

    @property
    def remaining(self) -> int:
        return self.request.max_tokens - len(self.generated)

    def take(self, token: int, logprobs: Any, finish_reason: str | None = None) -> bool:
        """One sampled token: publish its text; True when the sequence is done (an end token,
        a stop string, max_tokens, or every listener gone)."""
        self.first_token_at = self.first_token_at or time.perf_counter()
        self.taken.append(token)
        # With ignore_eos an end token is an answer token (counted, fed back) that shows no
        # text, as vLLM's default skip_special_tokens has it; the batch does not stop on it.
        end_token = token in self.eos and not self.request.ignore_eos
        if end_token:
            self.detokenizer.finalize()
        else:
            self.sampling.observe(token, logprobs)
            self.generated.append(token)
            if token not in self.eos:
                self.detokenizer.add_token(token)
            if finish_reason == "length" or self.remaining <= 0:
                self.detokenizer.finalize()
        emit, stopped = self.stops.feed(self.detokenizer.last_segment)
        self._publish(emit)
        if stopped:
            self.finish = "stop"
        elif end_token:
            self.finish = "stop"
        elif finish_reason == "length" or self.remaining <= 0:
            self.finish = "length"
        elif self.generation.cancelled.is_set():
            self.finish = "cancelled"
        return self.finish is not None

    def _publish(self, text: str) -> None:
        if text:  # log-probabilities wait for the text they belong to
            self.parts.append(text)
            self.generation.publish(Delta(text, self.sampling.take_logprobs()))

    def _speculation_usage(self) -> dict[str, int]:
        """Drafted/accepted figures; a prediction's as OpenAI counts them: its tokens that
        made it into the answer, and those drafted from it that did not."""
        f = self.drafter.figures if self.drafter is not None else None
        if f is None:
            return {}
        return {"drafted_tokens": f.drafted, "accepted_tokens": f.accepted,
                "accepted_prediction_tokens": f.predicted_accepted,
                "rejected_prediction_tokens": f.predicted_drafted - f.predicted_accepted}

    def answer(self, model_name: str) -> Answer:
        """The finished answer (the held-back tail of the text published first)."""
        self._publish(self.stops.flush())
        end = time.perf_counter()
        first = self.first_token_at or end
        return Answer(
            text="".join(self.parts),
            finish_reason=self.stops.finish_reason(self.finish or "length"),
            stop_sequence=self.stops.stops.matched,
            tool_calls=self.stops.tool_calls,
            usage=Usage(
                prompt_tokens=len(self.prompt),
                completion_tokens=len(self.generated),
                cached_tokens=self.cached,
                **self._speculation_usage(),
            ),
            model=model_name,
            logprobs=self.sampling.logprobs,
            prompt_logprobs=self.prompt_logprobs,
            prefill_seconds=first - self.started,
            generation_seconds=end - first,
        )

"""The token loop: mlx-lm's `generate_step` + `stream_generate`, reshaped for the time to
first token, which is what a prefix-cache hit is about.

Two differences from mlx-lm, both measured (benchmarks/prefix_follow_up.py):
- The last chunk of the prompt gives the logits of its last position only, in the same pass,
  instead of a state-only pass over all but one token followed by a one-token pass: a
  one-token pass reads every weight once more (~50 ms for the default model in float32 on a
  CPU, a fifth of a 40-token follow-up's prefill). Models whose structure does not allow it
  (checked at load by `supports_last_position_logits`) keep mlx-lm's way.
- The first token is handed out as soon as it is sampled. mlx-lm queues the second token's
  step before it hands out the first, and on the CPU `mx.async_eval` runs most of a step
  before it returns (measured: 54 of 66 ms), so the first token waited for the second.
And one fix: logits processors (repetition/presence/frequency penalties) see the whole prompt,
also when a prefix came from the cache, so a cached prefix cannot change a penalised answer.

Decoding pipelines like mlx-lm: the step that feeds token n is queued before token n is
handed out, so the state holds every token handed out except an end token or the last one
allowed by max_tokens (feeding those would cost a pass nobody reads).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass
class Step:
    token: int
    text: str  # the new text this token completes (may be "" mid-character)
    finish_reason: str | None  # "stop" (an end token: not part of the answer) or "length"
    logprobs: Any = None  # the normalised log-prob row it was sampled from (mx.array)


def generate_tokens(
    model: Any,
    tokenizer: Any,
    prompt: list[int],
    reused: int,
    prompt_cache: list[Any],
    *,
    sampler: Callable,
    logits_processors: list[Callable],
    max_tokens: int,
    prefill_step_size: int,
    last_only: bool = False,
    on_prefill: Callable[[int, int], None] = lambda done, total: None,
) -> Iterator[Step]:
    """Prefill `prompt[reused:]` on top of `prompt_cache` (which holds `prompt[:reused]`) and
    decode up to `max_tokens` tokens, ending early at an end token. A lone sequence's loop
    (benchmarks, tests); the engine runs `Prefill` and then mlx-lm's BatchGenerator."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream, wired_limit

    prefill = Prefill(
        model, prompt, reused, prompt_cache, sampler, logits_processors, prefill_step_size,
        last_only,
    )
    context = prefill.context

    def step(token: Any) -> tuple[Any, Any]:
        """Queue the pass that feeds `token` and samples the one after it."""
        nonlocal context
        logits = model(token[None], cache=prompt_cache)[:, -1, :]
        if logits_processors:
            context = mx.concatenate([context, token])
            for processor in logits_processors:
                logits = processor(context, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        following = sampler(logprobs)
        mx.async_eval(following, logprobs)
        return following, logprobs[0]

    detokenizer = tokenizer.detokenizer
    eos = tokenizer.eos_token_ids
    with wired_limit(model, [generation_stream]), mx.stream(generation_stream):
        on_prefill(0, prefill.total)
        while (first := prefill.advance()) is None:
            on_prefill(prefill.done, prefill.total)
        on_prefill(prefill.total, prefill.total)
        y, row = first
        for n in range(max_tokens):
            token, token_row = y.item(), row  # the first is ready; later ones were queued
            if token in eos:
                detokenizer.finalize()
                yield Step(token, detokenizer.last_segment, "stop", token_row)
                return
            last = n + 1 == max_tokens
            if n > 0 and not last:
                y, row = step(y)  # pipelining: the next token computes while this one goes out
            detokenizer.add_token(token)
            if last:
                detokenizer.finalize()
            yield Step(token, detokenizer.last_segment, "length" if last else None, token_row)
            if n == 0 and not last:
                y, row = step(y)  # after, not before: on the CPU, queuing a step runs most of it
            if n % 256 == 255:
                mx.clear_cache()


class Prefill:
    """One sequence's prompt, fed a chunk at a time (state only) so that the engine can run
    decode steps of other sequences in between; the last chunk also samples the first token
    (with the sequence's own processors, which see the whole prompt)."""

    def __init__(
        self, model: Any, prompt: list[int], reused: int, cache: list[Any], sampler: Callable,
        processors: list[Callable], step_size: int, last_only: bool,
    ) -> None:
        import mlx.core as mx

        self.model, self.cache, self.sampler = model, cache, sampler
        self.processors, self.step_size = list(processors), step_size
        self.todo = mx.array(prompt[reused:])
        self.total = self.todo.size
        self.context = mx.array(prompt) if self.processors else None
        self.last_only = last_only
        # What the last pass feeds: the tail of the last chunk (one token in mlx-lm's way).
        self._tail = (self.total - 1) % step_size + 1 if last_only else 1
        self.done = 0

    def next_tokens(self) -> int:
        """How many prompt tokens the next `advance` feeds."""
        stop = self.total - self._tail
        return min(self.step_size, stop - self.done) if self.done < stop else self.total - self.done

    def advance(self) -> tuple[Any, Any] | None:
        """Feed the next chunk; once the prompt is in, (first token, its log-probabilities
        row), both evaluated."""
        import mlx.core as mx

        stop = self.total - self._tail
        if self.done < stop:
            end = min(self.done + self.step_size, stop)
            self.model(self.todo[self.done : end][None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            mx.clear_cache()
            self.done = end
            return None
        rest = self.todo[self.done :][None]
        if self.last_only:
            logits = last_position_logits(self.model, rest, self.cache)
        else:
            logits = self.model(rest, cache=self.cache)
        logits = logits[:, -1, :]
        for processor in self.processors:
            logits = processor(self.context, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        y = self.sampler(logprobs)
        mx.eval(y, logprobs)
        self.done = self.total
        return y, logprobs[0]


def prefill_states(
    model: Any, tokens: Any, cache: list[Any], step_size: int,
    on_chunk: Callable[[int, int], None] = lambda done, total: None, total: int = 0,
) -> int:
    """Feed `tokens` (an mx.array) to the model in chunks, keeping only the state (no logits
    are computed); returns how many were fed."""
    import mlx.core as mx

    for start in range(0, tokens.size, step_size):
        model(tokens[start : start + step_size][None], cache=cache)
        mx.eval([c.state for c in cache])
        on_chunk(min(start + step_size, tokens.size), total)
        mx.clear_cache()
    return tokens.size


class _LastPosition:
    """Stands in for a model's inner network: hands the output layer only the last position."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner(*args, **kwargs)[:, -1:, :]

    def __getattr__(self, name: str) -> Any:  # embed_tokens etc., for tied output layers
        return getattr(self._inner, name)


def last_position_logits(model: Any, tokens: Any, cache: list[Any]) -> Any:
    """`model(tokens)[:, -1:]` without computing the output layer for the other positions.

    mlx-lm's models run `self.model(...)` and then the output layer; the inner network is
    swapped for one that keeps the last position for the length of the call (engine thread
    only, so nobody else sees the swap)."""
    inner = model.model
    object.__setattr__(model, "model", _LastPosition(inner))
    try:
        return model(tokens, cache=cache)
    finally:
        object.__delattr__(model, "model")


def supports_last_position_logits(model: Any) -> bool:
    """Whether `last_position_logits` gives this model's own last logits: it has an inner
    `model` and both ways agree on a few tokens (checked once, at load)."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.cache import make_prompt_cache

    if not isinstance(getattr(model, "model", None), nn.Module):
        return False
    tokens = mx.array([[1, 2, 3, 4]])
    try:
        full = model(tokens, cache=make_prompt_cache(model))[:, -1:, :]
        last = last_position_logits(model, tokens, make_prompt_cache(model))
        return full.shape == last.shape and mx.allclose(full, last, rtol=1e-3, atol=1e-3).item()
    except Exception:  # any surprise in the model's structure: mlx-lm's way, always correct
        return False

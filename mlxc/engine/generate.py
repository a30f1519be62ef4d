"""The token loop: mlx-lm's `generate_step` + `stream_generate`, reshaped for the time to
first token, which is what a prefix-cache hit is about.

Two differences from mlx-lm, both measured (benchmarks/prefix_follow_up.py):
- The last prompt tokens go through the model together with their logits, instead of a
  state-only pass over all but one token followed by a one-token pass: a one-token pass reads
  every weight once more (~50 ms for the default model in float32 on a CPU), which is a
  fifth of a 40-token follow-up's prefill.
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

# The last prompt tokens are run with logits: enough to make a follow-up one pass, few enough
# that computing the output layer for all of them costs less than one more pass.
FINAL_CHUNK = 64


@dataclass
class Step:
    token: int
    text: str  # the new text this token completes (may be "" mid-character)
    finish_reason: str | None  # "stop" (an end token: not part of the answer) or "length"


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
    on_prefill: Callable[[int, int], None] = lambda done, total: None,
) -> Iterator[Step]:
    """Prefill `prompt[reused:]` on top of `prompt_cache` (which holds `prompt[:reused]`) and
    decode up to `max_tokens` tokens, ending early at an end token."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream, wired_limit

    todo = mx.array(prompt[reused:])
    context = mx.array(prompt) if logits_processors else None

    def sample(logits: Any, fed: Any) -> Any:
        nonlocal context
        logits = logits[:, -1, :]
        if logits_processors:
            if fed is not None:
                context = mx.concatenate([context, fed])
            for processor in logits_processors:
                logits = processor(context, logits)
        return sampler(logits - mx.logsumexp(logits, keepdims=True))

    def step(token: Any) -> Any:
        """Queue the pass that feeds `token` and samples the one after it."""
        following = sample(model(token[None], cache=prompt_cache), token)
        mx.async_eval(following)
        return following

    detokenizer = tokenizer.detokenizer
    eos = tokenizer.eos_token_ids
    with wired_limit(model, [generation_stream]), mx.stream(generation_stream):
        y = _prefill(model, todo, prompt_cache, prefill_step_size, on_prefill, sample)
        for n in range(max_tokens):
            token = y.item()  # the first is ready; later ones were queued a step ago
            if token in eos:
                detokenizer.finalize()
                yield Step(token, detokenizer.last_segment, "stop")
                return
            last = n + 1 == max_tokens
            if n > 0 and not last:
                y = step(y)  # pipelining: the next token computes while this one goes out
            detokenizer.add_token(token)
            if last:
                detokenizer.finalize()
            yield Step(token, detokenizer.last_segment, "length" if last else None)
            if n == 0 and not last:
                y = step(y)  # after, not before: on the CPU, queuing a step runs most of it
            if n % 256 == 255:
                mx.clear_cache()


def _prefill(
    model: Any, todo: Any, cache: list[Any], step_size: int,
    on_prefill: Callable[[int, int], None], sample: Callable,
) -> Any:
    """Run the prompt tokens through the model in chunks; the last chunk (at most
    FINAL_CHUNK tokens) also gives the logits the first token is sampled from."""
    import mlx.core as mx

    total = todo.size
    tail = min(total, FINAL_CHUNK)
    done = 0
    on_prefill(0, total)
    while total - done > tail:
        n = min(step_size, total - done - tail)
        model(todo[done : done + n][None], cache=cache)
        mx.eval([c.state for c in cache])
        done += n
        on_prefill(done, total)
        mx.clear_cache()
    y = sample(model(todo[done:][None], cache=cache), None)
    mx.eval(y)
    on_prefill(total, total)
    return y

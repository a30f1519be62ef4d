"""Decode speed of a loaded model, for benchmarks/gpu_decode.py: one stream through mlx-lm's
`stream_generate`, several through its `BatchGenerator`, on prompts of WORDS words each."""

from __future__ import annotations

import statistics
import time
from typing import Any

import mlx.core as mx

WORDS = 24  # a prompt's words (gpu_decode.py --words)


def prompt_ids(tokenizer: Any, i: int, words: int | None = None) -> list[int]:
    words = WORDS if words is None else words
    text = f"Request {i}: " + " ".join(f"word{(i * 7 + j) % 97}" for j in range(words))
    return tokenizer.encode(text)


def one_stream(model: Any, tokenizer: Any, tokens: int, repeat: int = 3) -> float:
    from mlx_lm import stream_generate

    speeds = []
    for i in range(repeat + 1):  # the first warms up
        *_, last = stream_generate(model, tokenizer, mx.array(prompt_ids(tokenizer, i)),
                                   max_tokens=tokens)
        speeds.append(last.generation_tps)
    return statistics.median(speeds[1:])


def streams(model: Any, tokenizer: Any, count: int, tokens: int, repeat: int = 3) -> float:
    """Aggregate decode tokens/s of `count` streams in mlx-lm's BatchGenerator (no stop
    tokens: each runs `tokens`), from the step that starts decoding to the last."""
    from mlx_lm.generate import BatchGenerator

    speeds = []
    for r in range(repeat + 1):
        gen = BatchGenerator(model, max_tokens=tokens, stop_tokens=[])
        gen.insert([prompt_ids(tokenizer, r * count + i) for i in range(count)])
        made, start, done = 0, None, 0
        while done < count:
            responses = gen.next_generated()
            if start is None:
                start = time.perf_counter()
                continue
            made += len(responses)
            done += sum(1 for x in responses if x.finish_reason is not None)
        speeds.append(made / (time.perf_counter() - start))
        gen.close()
    return statistics.median(speeds[1:])

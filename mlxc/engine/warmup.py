"""Kernel warm-up before a server reports ready: MLX's CUDA backend compiles each kernel on
its first use (~20 s for a first generation on an H200), so `mlxc serve` runs the model once
through every path a request takes, and the first client finds them compiled.

The paths: prefill with the last-position shortcut, at lengths that reach each kind of
matmul kernel (on a GPU up to a whole prefill chunk: a fresh H200 still spent 17 s compiling in
the first request after a warm-up that prefilled only 14 tokens); a lone decode (batch/lone.py's
ops) greedy, and sampled with a seeded key and a penalty; batched decodes from `max_batch` sequences
down to one, one of them joining a running batch. No cache is touched.
"""

from __future__ import annotations

from typing import Any


def warm_up(engine: Any) -> None:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler, make_logits_processors

    from mlxc.engine.batch.generator import Batch
    from mlxc.engine.decode.generate import generate_tokens
    from mlxc.engine.decode.seeds import keyed_sampler
    from mlxc.model.dtype import gpu_backend

    model, step = engine.model, engine.prefill_step_size
    text = "Warm up: the quick brown fox jumps over the lazy dog. "
    tokens = engine.tokenizer.encode(text * (1 + (step + 8) // 10))
    penalty = make_logits_processors(repetition_penalty=1.1)
    # The CPU backend compiles nothing: short prompts are enough there (and start faster).
    lengths = [14, 40, 130, step + 7] if gpu_backend() else [14]
    runs = [(n, greedy_sampler, []) for n in lengths]
    runs.append((5, keyed_sampler(0, 0.7, 0.9), penalty))
    for n, sampler, processors in runs:
        for _ in generate_tokens(
            model, engine.tokenizer, tokens[:n], 0, make_prompt_cache(model), sampler=sampler,
            logits_processors=processors, max_tokens=4, prefill_step_size=step,
            last_only=engine.last_only,
        ):
            pass
    batch = Batch(engine.batch_model, prefill_step_size=step,
                  completion_batch_size=engine.max_batch)
    tokens = tokens[:14]
    with engine.batch_kernels:  # as the scheduler runs batched steps (CUDA: mlxc's kernels)
        others = engine.max_batch - 1
        # The first still decodes when the others join: every batch size decodes once
        # (on CUDA each is a compiled step's shape, traced here rather than in a burst).
        batch.insert([tokens], max_tokens=[others + 6])
        batch.next_generated()
        if others:  # they join the running batch, then leave one by one
            batch.insert([tokens[: 5 + i] for i in range(others)],
                         max_tokens=[2 + i for i in range(others)])
        while batch.next_generated():
            pass
    batch.close()
    mx.clear_cache()

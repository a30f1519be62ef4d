"""Work mirrored from rank 0 to every rank, as mlx_lm.server does: rank 0 decides what runs
next and shares it; every rank then runs the same steps on its shard, whose collectives
(tensor parallel's all_sum, pipeline's send/recv and all_gather) meet in the same order.

Shared objects are JSON (never pickle, unlike mlx_lm.server: a peer's bytes must not run
code here), sent as one all_sum of a fixed head (others add zeros), two for long ones."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

HEAD = 1024  # bytes every share sends at once: a decode step's job fits, in one collective


def share(group: Any, obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank (others pass nothing). Every rank must call it together.

    One all_sum of HEAD bytes (a 4-byte length, then the JSON; others add zeros), and a
    second for what does not fit: each collective costs a round trip to MLX's stream thread
    (~2 ms measured on this shared 2-core CPU), more than its bytes."""
    import mlx.core as mx

    if group.size() == 1:
        return obj
    if group.rank() == 0:
        data = json.dumps(obj, separators=(",", ":")).encode()
        framed = len(data).to_bytes(4, "little") + data
        head = framed[:HEAD].ljust(HEAD, b"\0")
        mx.eval(_sum(group, mx.array(memoryview(head), dtype=mx.uint8)))
        if len(framed) > HEAD:
            mx.eval(_sum(group, mx.array(memoryview(framed[HEAD:]), dtype=mx.uint8)))
        return obj
    head = bytes(memoryview(_sum(group, mx.zeros(HEAD, dtype=mx.uint8))))
    size = int.from_bytes(head[:4], "little")
    data = head[4:4 + size]
    if size + 4 > HEAD:
        data += bytes(memoryview(_sum(group, mx.zeros(size + 4 - HEAD, dtype=mx.uint8))))
    return json.loads(data)


def _sum(group: Any, array: Any) -> Any:
    import mlx.core as mx

    return mx.distributed.all_sum(array, group=group, stream=collective_stream())


def collective_stream() -> Any:
    """Where the sharing collectives run: the CPU (ring, MPI, JACCL), or the GPU's default
    stream on CUDA, where NCCL reduces GPU arrays only (as mlx_lm.server does; untested here)."""
    import mlx.core as mx

    return None if mx.cuda.is_available() else mx.cpu


@dataclass
class Greedy:
    """One lone sequence's greedy tokens, and at each step the gap between the two highest
    log-probabilities (how close a reduction-order change came to flipping the choice)."""

    tokens: list[int] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0


def greedy(model: Any, prompt: list[int], max_tokens: int, eos: set[int]) -> Greedy:
    """mlx-lm's generate_step, argmax; run on every rank with the same prompt."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    out, started = Greedy(), time.perf_counter()
    steps: Iterator = generate_step(mx.array(prompt), model, max_tokens=max_tokens,
                                    sampler=lambda logprobs: mx.argmax(logprobs, axis=-1))
    for token, logprobs in steps:
        token = int(token)
        top2 = mx.topk(logprobs, 2).tolist()
        out.gaps.append(abs(top2[0] - top2[1]))
        out.tokens.append(token)
        if len(out.tokens) == 1:
            out.prefill_s = time.perf_counter() - started
        if token in eos:
            break
    out.decode_s = time.perf_counter() - started - out.prefill_s
    return out


def serve_jobs(group: Any, model: Any, eos: set[int], jobs: list[dict] | None = None
               ) -> list[Greedy]:
    """Rank 0 hands out `jobs` ({"prompt": [ids], "max_tokens": n}) one by one, then a stop;
    the other ranks follow until the stop. Returns rank 0's results (others: [])."""
    results = []
    pending = list(jobs or [])
    while True:
        job = share(group, (pending.pop(0) if pending else {"stop": True})
                    if group.rank() == 0 else None)
        if job.get("stop"):
            return results
        result = greedy(model, job["prompt"], job["max_tokens"], eos)
        if group.rank() == 0:
            results.append(result)

"""Where a burst's prompt pass goes: N short prompts prefilled one by one, or together the
way mlx-lm's `PromptProcessingBatch.prompt` does it, with and without its steps.

    python benchmarks/diagnostics/burst_prefill.py --model PATH [--prompts 8] [--dequantize]

Variants (ms, median of 3 after one warm pass, the same lengths; then once with lengths
never seen, which pays for any shape-specific set-up):
- lone: each prompt alone in a `KVCache` (what a request that comes alone gets);
- batch_mlx_lm: right-padded to the longest, `prepare`, the pass, `mx.clear_cache()`,
  `finalize` (right padding rolled to the left), `mx.clear_cache()`: mlx-lm's steps;
- batch_keep_cache: the same without the two `mx.clear_cache()` calls;
- batch_left: left-padded from the start (`BatchKVCache(left_padding)`, a causal mask).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--dequantize", action="store_true")
    args = parser.parse_args()
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache, KVCache
    from shared import load_model

    model = load_model(args.model, args.dequantize)
    layers = len(model.layers)

    def lone(prompts: list[list[int]]) -> None:
        for p in prompts:
            cache = [KVCache() for _ in range(layers)]
            mx.eval(model(mx.array([p]), cache=cache)[:, -1])

    def batch_mlx_lm(prompts: list[list[int]], clear: bool = True) -> None:
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        cache = [BatchKVCache([0] * len(prompts)) for _ in range(layers)]
        tokens = mx.array([p + [0] * (longest - len(p)) for p in prompts])
        for c in cache:
            c.prepare(lengths=lengths, right_padding=padding)
        model(tokens, cache=cache)
        mx.eval([c.state for c in cache])
        if clear:
            mx.clear_cache()
        for c in cache:
            c.finalize()
        mx.eval([c.state for c in cache])
        if clear:
            mx.clear_cache()

    def batch_left(prompts: list[list[int]]) -> None:
        longest = max(len(p) for p in prompts)
        cache = [BatchKVCache([longest - len(p) for p in prompts]) for _ in range(layers)]
        tokens = mx.array([[0] * (longest - len(p)) + p for p in prompts])
        mx.eval(model(tokens, cache=cache)[:, -1])

    variants = {"lone": lone, "batch_mlx_lm": batch_mlx_lm,
                "batch_keep_cache": lambda p: batch_mlx_lm(p, clear=False),
                "batch_left": batch_left}
    rng = random.Random(0)

    def prompts_of(lengths: list[int]) -> list[list[int]]:
        return [[rng.randrange(100, 1000) for _ in range(n)] for n in lengths]

    seen = prompts_of([30 + (7 * i) % 11 for i in range(args.prompts)])
    out = {}
    for name, run in variants.items():
        run(seen)  # warm: these shapes once
        times = []
        for _ in range(3):
            started = time.perf_counter()
            run(seen)
            times.append(time.perf_counter() - started)
        fresh = prompts_of([41 + len(out) * 13 + (5 * i) % 9 for i in range(args.prompts)])
        started = time.perf_counter()
        run(fresh)
        out[name] = {"ms": round(1000 * statistics.median(times), 1),
                     "new_lengths_ms": round(1000 * (time.perf_counter() - started), 1)}
    print(json.dumps({"prompts": args.prompts, "tokens": sum(map(len, seen)), **out}, indent=1))


if __name__ == "__main__":
    main()

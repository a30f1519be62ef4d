"""What a speculative verify pass costs against a plain decode step, on mlxc's own loading of a
model (its `--dtype auto`): ms of one pipelined plain step, and of one verify pass of k+1
positions (decode/speculate.py `verify`, then the trim), medians. A draft pays off only when
the tokens it takes per pass exceed verify/plain — the ratio the drafter's cost gate uses.

    python benchmarks/diagnostics/verify_cost.py [--model PATH] [--context 600] [--ks 1,2,4,8,12]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--context", type=int, default=600)
    parser.add_argument("--ks", default="1,2,4,8,12")
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()

    from mlxc.model.blas import load_optimised_blas

    load_optimised_blas()  # before the first `import mlx.core`, as the engine does
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    from mlxc.config import load_settings
    from mlxc.engine.decode.speculate import verify
    from mlxc.model.dtype import apply_dtype, effective_dtype_without_mlx
    from mlxc.model.refs import resolve_model

    settings = load_settings()
    path = args.model or str(resolve_model(settings.model, settings).folder)
    model, _ = load(path)
    dtype = effective_dtype_without_mlx(settings.dtype, Path(path), settings.cache_dir)
    apply_dtype(model, dtype)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[7] * args.context]), cache=cache))
    token = mx.array([11])

    def plain_steps(n: int = 16) -> float:
        """Pipelined as the lone loop runs: queue step i+1, then read step i."""
        start = time.perf_counter()
        pending = mx.argmax(model(token[None], cache=cache)[:, -1, :], axis=-1)
        mx.async_eval(pending)
        for _ in range(n - 1):
            nxt = mx.argmax(model(pending[None], cache=cache)[:, -1, :], axis=-1)
            mx.async_eval(nxt)
            pending.item()
            pending = nxt
        pending.item()
        elapsed = (time.perf_counter() - start) / n
        trim_prompt_cache(cache, n)
        return elapsed

    def verify_pass(k: int) -> float:
        start = time.perf_counter()
        verify(model, cache, token, [13] * k)
        elapsed = time.perf_counter() - start
        trim_prompt_cache(cache, k + 1)
        return elapsed

    plain_steps()
    plain = statistics.median(plain_steps() for _ in range(args.repeat))
    report = {"model": path, "dtype": dtype, "context": args.context, "plain_ms": plain * 1e3,
              "verify_ms": {}}
    for k in (int(v) for v in args.ks.split(",")):
        verify_pass(k)
        report["verify_ms"][k] = statistics.median(verify_pass(k) for _ in range(args.repeat)) * 1e3
    report["break_even_tokens"] = {k: v / report["plain_ms"]
                                   for k, v in report["verify_ms"].items()}
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

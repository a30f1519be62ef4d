"""What a new batch shape costs the compiled decode step (`mlxc/engine/cuda/compiled_decode.py`):
the first step at each batch size, traced, against the steps after it.

    python benchmarks/diagnostics/trace_cost.py --model PATH [--sizes 2,3,4,5,6,7,8] [--context 200]

Two passes over the sizes, each with a fresh `CompiledDecode`: in the first, the process has
never run those shapes (kernels MLX builds for them at run time included); in the second,
only the trace is new. Reports ms per size: the first step, and the median of the next 8.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", default="2,3,4,5,6,7,8")
    parser.add_argument("--context", type=int, default=200)
    args = parser.parse_args()
    import mlx.core as mx
    from shared import batch_caches, filled, load_model, row_lengths

    from mlxc.engine.cuda.compiled_decode import CompiledDecode

    model = load_model(args.model)

    def step(forward, caches, y) -> tuple:
        started = time.perf_counter()
        y = mx.argmax(forward(y, cache=caches)[:, -1, :], axis=-1, keepdims=True)
        mx.eval(y)
        return y, (time.perf_counter() - started) * 1000

    out = {}
    for label in ("fresh process", "kernels built before"):
        compiled, figures = CompiledDecode(model), {}
        for size in [int(s) for s in args.sizes.split(",")]:
            caches = filled(model, batch_caches(model), row_lengths(args.context, size))
            y, first = step(compiled, caches, mx.array([[1]] * size))
            after = []
            for _ in range(8):
                y, ms = step(compiled, caches, y)
                after.append(ms)
            figures[size] = {"first_ms": round(first, 1),
                             "then_ms": round(statistics.median(after), 2)}
        out[label] = {"sizes": figures, "traces": compiled.traces,
                      "trace_seconds": round(compiled.trace_seconds, 3), "failed": compiled.failed}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

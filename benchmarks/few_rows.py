"""Device time of one decode step's projections at a few rows: MLX's matmul against mlxc's
few-rows kernel (`mlxc/engine/small_rows.py`) in several block shapes. CUDA only.

    python benchmarks/few_rows.py [--rows 1,2,4,8] [--dtypes float32,bfloat16]
                                  [--shapes 1x4,4x4,8x2] [--layers 28]

The weights are random, of a Llama-3.2-3B-like shape (what `make_model.py 3b` builds; 12 GB
in float32), each layer its own so nothing is read from the L2 cache. Every projection of one
step is chained into one evaluation, so launches overlap as in a compiled step. Reports the
median ms per step and the weights' bytes per second; the 1-row figure is MLX's gemv, the
floor a batched step aims at. A shape is FEATURESxWARPS: outputs per block x warps per block.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def shapes(layers: int, hidden: int, kv: int, ffn: int, vocab: int) -> list[tuple[int, int]]:
    """(out, in) of every projection of one decode step."""
    layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden),
             (ffn, hidden), (ffn, hidden), (hidden, ffn)]
    return layer * layers + [(vocab, hidden)]


def timed(step, reps: int) -> float:
    import mlx.core as mx

    for _ in range(2):
        mx.eval(step())
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        mx.eval(step())
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default="1x4,2x4,4x4,8x4,4x2,8x2,4x8")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args()
    import mlx.core as mx

    blocks = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    out = {}
    for name in args.dtypes.split(","):
        out[name] = measure(getattr(mx, name), args, blocks)
        mx.clear_cache()
    print(json.dumps(out, indent=1))


def measure(dtype, args, blocks: list) -> dict:
    import mlx.core as mx

    from mlxc.engine import small_rows

    weights = [(mx.random.normal(s) * 0.02).astype(dtype)
               for s in shapes(args.layers, 3072, 1024, 8192, 49152)]
    mx.eval(weights)
    gigabytes = sum(w.nbytes for w in weights) / 1e9
    figures = {"weights_gb": round(gigabytes, 2)}
    for rows in [int(r) for r in args.rows.split(",")]:
        xs = {k: mx.random.normal((rows, 1, k)).astype(dtype) for k in (3072, 8192)}
        mx.eval(xs)
        ways = {"mlx": lambda xs=xs: [xs[w.shape[1]] @ w.T for w in weights]}
        if rows > 1:
            for f, warps in blocks:
                ways[f"{f}x{warps}"] = lambda xs=xs, f=f, warps=warps: [
                    small_rows.project(xs[w.shape[1]], w, (f, warps)) for w in weights]
        for way, step in ways.items():
            ms = timed(step, args.reps)
            figures[f"{rows}_{way}"] = {"ms": round(ms, 3), "gb_s": round(gigabytes / ms * 1000)}
        if rows > 1:
            figures[f"{rows}_error"] = errors(xs, weights[:7], blocks)
    return figures


def errors(xs: dict, weights: list, blocks: list) -> dict:
    """Each block shape's largest difference from a float32 matmul on the CPU, relative."""
    import mlx.core as mx

    from mlxc.engine import small_rows

    worst = {}
    for f, warps in blocks:
        gap = 0.0
        for w in weights:
            x = xs[w.shape[1]]
            want = mx.matmul(x.astype(mx.float32), w.astype(mx.float32).T, stream=mx.cpu)
            got = small_rows.project(x, w, (f, warps)).astype(mx.float32)
            gap = max(gap, (mx.abs(got - want).max() / mx.abs(want).max()).item())
        worst[f"{f}x{warps}"] = float(f"{gap:.2e}")
    return worst


if __name__ == "__main__":
    main()

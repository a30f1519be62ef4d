"""Device time of one decode step's projections at a few rows: MLX's matmul against mlxc's
few-rows kernel (`mlxc/engine/cuda/small_rows.py`) in several block shapes. CUDA only.

    python benchmarks/diagnostics/few_rows.py [--rows 1,2,4,8] [--dtypes float32,bfloat16]
                                  [--shapes 1x4,4x4,8x2] [--layers 28]

The weights are random, of a Llama-3.2-3B-like shape (what `make_model.py 3b` builds; 12 GB
in float32), each layer its own so nothing is read from the L2 cache. The projections wait on
each other as in a model's layer (q, k, v from the layer's input; o from q; gate and up from o;
down from their product; the next layer from down), in one evaluation. Reports the
median ms per step and the weights' bytes per second; the 1-row figure is MLX's gemv, the
floor a batched step aims at. A shape is FEATURESxWARPS: outputs per block x warps per block.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def layers_of(count: int, dtype) -> list[dict]:
    """Each layer's weights (out, in), scaled so the activations keep their size."""
    import mlx.core as mx

    def weight(out: int, inner: int):
        return (mx.random.normal((out, inner)) / inner ** 0.5).astype(dtype)

    hidden, kv, ffn = 3072, 1024, 8192
    return [{"q": weight(hidden, hidden), "k": weight(kv, hidden), "v": weight(kv, hidden),
             "o": weight(hidden, hidden), "gate": weight(ffn, hidden), "up": weight(ffn, hidden),
             "down": weight(hidden, ffn)} for _ in range(count)] + [{"head": weight(49152, hidden)}]


def step(x, layers: list[dict], project) -> list:
    """One step's projections, each waiting on what it reads as in a model."""
    kept = []
    for layer in layers[:-1]:
        q, k, v = (project(x, layer[n]) for n in ("q", "k", "v"))
        o = project(q, layer["o"])
        x = project(project(o, layer["gate"]) * project(o, layer["up"]), layer["down"])
        kept += [k, v]
    return [project(x, layers[-1]["head"]), *kept]


def timed(run, reps: int) -> float:
    import mlx.core as mx

    for _ in range(2):
        mx.eval(run())
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        mx.eval(run())
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1,2,4,8")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--shapes", default="1x4,2x4,4x4,8x4,4x2,2x8,4x8")
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

    from mlxc.engine.cuda import small_rows

    layers = layers_of(args.layers, dtype)
    mx.eval(layers)
    gigabytes = sum(w.nbytes for layer in layers for w in layer.values()) / 1e9
    figures = {"weights_gb": round(gigabytes, 2)}
    for rows in [int(r) for r in args.rows.split(",")]:
        x = mx.random.normal((rows, 1, 3072)).astype(dtype)
        ways = {"mlx": lambda x=x: step(x, layers, lambda a, w: a @ w.T)}
        if rows > 1:
            for f, warps in blocks:
                ways[f"{f}x{warps}"] = lambda x=x, f=f, warps=warps: step(
                    x, layers, lambda a, w: small_rows.project(a, w, (f, warps)))
        for way, run in ways.items():
            ms = timed(run, args.reps)
            figures[f"{rows}_{way}"] = {"ms": round(ms, 3), "gb_s": round(gigabytes / ms * 1000)}
        if rows > 1:
            figures[f"{rows}_error"] = errors(rows, dtype, layers[0], blocks)
    return figures


def errors(rows: int, dtype, layer: dict, blocks: list) -> dict:
    """Each block shape's largest difference from a float32 matmul on the CPU, relative."""
    import mlx.core as mx

    from mlxc.engine.cuda import small_rows

    worst = {}
    for f, warps in blocks:
        gap = 0.0
        for w in layer.values():
            x = mx.random.normal((rows, 1, w.shape[1])).astype(dtype)
            want = mx.matmul(x.astype(mx.float32), w.astype(mx.float32).T, stream=mx.cpu)
            got = small_rows.project(x, w, (f, warps)).astype(mx.float32)
            gap = max(gap, (mx.abs(got - want).max() / mx.abs(want).max()).item())
        worst[f"{f}x{warps}"] = float(f"{gap:.2e}")
    return worst


if __name__ == "__main__":
    main()

"""What one batched decode step costs, part by part, on mlx-lm's model code alone.

    python benchmarks/diagnostics/decode_step.py --model PATH [--sizes 1,4,8] [--steps 64]
        [--context 200]

Each variant runs the model's decode step pipelined as mlx-lm does (queue step n+1, then read
token n) and reports ms per step, and how much of it Python spends building the step
(`build_ms`: when that is close to the step, the step is bound by the host, not the device):
- lone: one sequence, `KVCache` (what `stream_generate` runs);
- plain_B: B sequences of the same length in one `KVCache` (no mask, int offset);
- batch_B: `BatchKVCache` with left padding (a boolean mask, per-row offsets): mlx-lm's
  `BatchGenerator`;
- batch_B_nopad: the same with every row the same length (the mask still built);
- batch_B_additive: padded, with the mask built once per step as additive float;
- batch_B_compiled: padded, through mlxc's compiled step (`mlxc/engine/cuda/compiled_decode.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", default="1,4,8")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--dequantize", action="store_true")
    parser.add_argument("--kernels", action="store_true",
                        help="then again with mlxc's batched-decode kernels (CUDA)")
    parser.add_argument("--variants", default="plain,batch,batch_nopad,batch_additive")
    parser.add_argument("--block", help="FxW: the few-rows kernel's block shape for float32 "
                        "weights (mlxc/engine/cuda/small_rows.py BLOCKS)")
    args = parser.parse_args()
    if args.block:
        from mlxc.engine.cuda import small_rows

        small_rows.BLOCKS[4] = tuple(int(v) for v in args.block.split("x"))
    import mlx.core as mx
    from mlx_lm.models import base
    from shared import batch_caches, filled, load_model, lone_caches, row_lengths

    model = load_model(args.model, args.dequantize)
    layers = len(model.layers)
    logits = model(mx.array([[1]]))
    vocab, dtype = logits.shape[-1], logits.dtype  # the activations' dtype

    def run(caches, size: int, additive: bool = False, forward=model) -> dict:
        original = base.create_causal_mask
        if additive:  # one float mask per step instead of a bool one per layer
            def create(*a, **k):
                m = original(*a, **k)
                return mx.where(m, mx.array(0, dtype), mx.array(-mx.inf, dtype))

            base.create_causal_mask = create
        try:
            y = mx.array([[1]] * size)
            build = []
            started = None
            for step in range(args.steps + 4):
                if step == 4:
                    started, build = time.perf_counter(), []
                t0 = time.perf_counter()
                logits = forward(y, cache=caches)[:, -1, :]
                nxt = mx.argmax(logits, axis=-1, keepdims=True).astype(mx.uint32)
                t1 = time.perf_counter()
                mx.async_eval(nxt)
                build.append((t1 - t0, time.perf_counter() - t1))
                mx.eval(y)
                y = nxt
            mx.eval(y)
            seconds = time.perf_counter() - started
        finally:
            base.create_causal_mask = original
        graph = sorted(b[0] for b in build)[len(build) // 2]
        launch = sorted(b[1] for b in build)[len(build) // 2]
        return {"step_ms": round(seconds / args.steps * 1000, 3),
                "graph_ms": round(graph * 1000, 3), "launch_ms": round(launch * 1000, 3),
                "tokens_per_second": round(size * args.steps / seconds, 1)}

    plain, batch = lone_caches(model), batch_caches(model)

    def fill(cache_of, rows: list[int]):
        return filled(model, cache_of, rows)

    from mlxc.engine.cuda.compiled_decode import CompiledDecode

    sizes = [int(s) for s in args.sizes.split(",")]
    variants = args.variants.split(",")

    def measure() -> dict:
        out: dict = {}
        ctx = args.context
        compiled = CompiledDecode(model)  # traced afresh: with the kernels, when they are on
        for _ in range(2):  # the first round compiles
            out["lone"] = run(fill(plain, [ctx]), 1)
        for size in sizes:
            rows = row_lengths(ctx, size)
            for _ in range(2):
                if "plain" in variants:
                    out[f"plain_{size}"] = run(fill(plain, [ctx] * size), size)
                if "batch" in variants:
                    out[f"batch_{size}"] = run(fill(batch, rows), size)
                if "batch_nopad" in variants:
                    out[f"batch_{size}_nopad"] = run(fill(batch, [ctx] * size), size)
                if "batch_compiled" in variants:  # mlxc's compiled step (cuda/compiled_decode.py)
                    out[f"batch_{size}_compiled"] = run(fill(batch, rows), size, forward=compiled)
                if "batch_additive" in variants:
                    out[f"batch_{size}_additive"] = run(fill(batch, rows), size, additive=True)
        out["projections"] = projections(model, sizes, dtype)
        out["compiled_failed"] = compiled.failed
        return out

    out = {"layers": layers, "vocab": vocab, "context": args.context, **measure()}
    if args.kernels:
        from mlxc.engine.cuda.batch_kernels import BatchKernels

        out["small_rows_error"] = kernel_error(model, sizes, dtype)
        with BatchKernels(model):
            out["kernels"] = measure()
    print(json.dumps(out, indent=1))


def kernel_error(model, sizes: list[int], dtype) -> dict:
    """Largest relative difference of the kernel from MLX's matmul, by rows."""
    import mlx.core as mx

    from mlxc.engine.cuda import small_rows

    out = {}
    for rows in sizes:
        worst = 0.0
        for proj in (model.layers[0].self_attn.k_proj, model.layers[0].mlp.down_proj):
            weight = proj.weight
            x = mx.random.normal((rows, 1, weight.shape[1])).astype(dtype)
            want = x @ weight.T
            got = small_rows.project(x, weight)
            err = (mx.abs(got - want).max() / mx.abs(want).max()).item()
            worst = max(worst, err)
        out[rows] = worst
    return out


def projections(model, sizes: list[int], dtype) -> dict:
    """Device time of each kind of projection over all layers (one step's worth), by rows:
    the layers are chained in one evaluation, so launch cost is spread thin."""
    import mlx.core as mx

    kinds = {name: [getattr(getattr(layer, part), name) for layer in model.layers]
             for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 ("mlp", ("gate_proj", "up_proj", "down_proj")))
             for name in names}
    head = getattr(model, "lm_head", None) or model.model.embed_tokens.as_linear
    kinds["lm_head"] = [head]
    out = {}
    for name, modules in kinds.items():
        out[name] = {}
        for rows in sizes:
            def step(x, modules=modules):
                return [m(x) for m in modules]

            inner = _in_features(modules[0], name, model)
            x = mx.random.normal((rows, 1, inner)).astype(dtype)
            mx.eval(step(x))
            started = time.perf_counter()
            for _ in range(10):
                mx.eval(step(x))
            out[name][rows] = round((time.perf_counter() - started) / 10 * 1000, 3)
    return out


def _in_features(module, name: str, model) -> int:
    if name == "lm_head":
        return model.model.embed_tokens.weight.shape[-1] * (
            32 // getattr(model.model.embed_tokens, "bits", 32))
    return module.weight.shape[-1] * (32 // getattr(module, "bits", 32))


if __name__ == "__main__":
    main()

"""Quantized models on CUDA (issue 24): each target beside raw mlx-lm on the same weights, medians
of one run. Parts (`--parts`, all by default):

- `kernels`: the device's copy bandwidth, then each 3B projection of 1-16 rows through MLX's
  `quantized_matmul` and mlxc's kernel (engine/cuda/quant_rows.py), chained as in a step;
- `decode`: one stream and 8 streams — raw mlx-lm (`stream_generate`, `BatchGenerator`) on the
  4-bit weights; the same through mlxc's compiled step (engine/cuda/compiled_decode.py), with
  the stacked projections (cuda/fused_projections.py), with mlxc's kernel switched in; and
  dequantized to bfloat16, raw and compiled;
- `engine`: mlxc's own engine (the lone loop and the continuous batch, as `mlxc serve` runs
  them), one request and 8 at once, `--dtype keep` and `auto`, projections stacked or not;
- `prefill`: a 20,000-token prompt — raw mlx-lm, with the dequantize-then-GEMM path, bfloat16;
- `identity`: greedy tokens over 128 tokens on 50 prompts, kernel on against off (each
  difference with its logit gap).

A mixture of experts (qwen3_moe, `make_model.py OUT moe`) runs every part: its targets are one
stream against raw mlx-lm and 8 streams against one; its `bfloat16` rows dequantize attention,
router and head, as `--dtype` does (the experts stay 4-bit). Each dtype's model is loaded once
and its variants applied in turn. Off CUDA the kernel's rows are left out: a check that the
parts run (tests/test_moe_decode.py), not figures.

Usage (GPU machine, ../shared/gpu/README.md):
  python3 .gpu/c2/make_model.py /tmp/m3b 3b
  python3 benchmarks/gpu_decode.py /tmp/m3b --json $OUT/gpu_decode.json
  python3 benchmarks/gpu_decode.py /tmp/m3b --parts kernels --blocks 4x4,8x4,2x4,4x2
  LAYERS=12 python3 .gpu/c2/make_model.py /tmp/moe moe
  python3 benchmarks/gpu_decode.py /tmp/moe --parts decode,engine,identity --prompts 10
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import gpu_streams
import mlx.core as mx
from gpu_streams import one_stream, prompt_ids, streams

from mlxc.engine.cuda import quant_rows

PARTS = ("kernels", "decode", "engine", "prefill", "identity")
SHAPES_3B = [(3072, 3072), (1024, 3072), (1024, 3072), (3072, 3072), (8192, 3072),
             (8192, 3072), (3072, 8192)]  # (N, K) of q, k, v, o, gate, up, down
ROWS = (1, 2, 4, 8, 16)


def median_time(fn: Any, repeat: int = 5, inner: int = 1) -> float:
    fn()  # warm up (and compile)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def bandwidth() -> float:
    """Bytes/s of a 2 GiB copy (read + write)."""
    a = mx.zeros((2**29,), dtype=mx.float32)
    mx.eval(a)

    def copy():
        mx.eval(a + 1)

    return 2 * a.nbytes / median_time(copy, 5)


def part_kernels(blocks: list[tuple[int, int]], report: dict) -> None:
    bw = bandwidth()
    report["bandwidth_gb_s"] = bw / 1e9
    print(f"device copy bandwidth {bw / 1e9:,.0f} GB/s")
    for bits in (4, 8):
        layers = []
        for n, k in SHAPES_3B * 4:  # 4 layers' worth, so the chain outlasts launch gaps
            w = (mx.random.normal((n, k)) * 0.02).astype(mx.bfloat16)
            layers.append(mx.quantize(w, group_size=64, bits=bits))
        mx.eval(layers)
        weight_bytes = sum(w.nbytes + s.nbytes + b.nbytes for w, s, b in layers)
        for rows in ROWS:
            row = time_rows(layers, bits, rows, blocks)
            row["best_of_bandwidth"] = weight_bytes / (row["best_ms"] / 1e3) / bw
            report.setdefault("kernels", []).append(row)
            print(f"{bits}-bit rows {rows:2d}: " + ", ".join(
                f"{key} {v:.3f}" for key, v in row.items() if key.endswith("_ms"))
                + f"  (best at {row['best_of_bandwidth']:.0%} of copy bandwidth)", flush=True)


def time_rows(layers: list, bits: int, rows: int, blocks: list[tuple[int, int]]) -> dict:
    """ms for the chain of `layers` at `rows` rows: MLX's op, then the kernel per block."""
    xs = {k: mx.random.normal((rows, 1, k)).astype(mx.bfloat16) for _, k in SHAPES_3B}
    mx.eval(xs)

    def chain(op: Any) -> None:
        mx.eval([op(xs[w.shape[1] * 32 // bits], w, s, b) for w, s, b in layers])

    def mlx_op(x: Any, w: Any, s: Any, b: Any) -> Any:
        return mx.quantized_matmul(x, w, s, b, transpose=True, group_size=64, bits=bits)

    row = {"bits": bits, "rows": rows, "mlx_ms": median_time(lambda: chain(mlx_op)) * 1e3}
    for block in blocks:
        def ours(x: Any, w: Any, s: Any, b: Any, block: tuple = block) -> Any:
            return quant_rows.project(x, w, s, b, 64, bits, block)

        row[f"kernel_{'x'.join(map(str, block))}_ms"] = median_time(lambda: chain(ours)) * 1e3
    row["best_ms"] = min(v for key, v in row.items() if key.startswith("kernel_"))
    return row


def load(path: str, dtype: str = "keep", kernel: bool = False, fused: bool = False,
         compiled: bool = False) -> tuple[Any, Any]:
    """The model as a variant runs it: stacked projections, then the kernel, then the
    compiled step around it (as engine/load.py builds them)."""
    from mlx_lm import load as mlx_load

    from mlxc.engine.cuda.compiled_decode import CompiledDecode
    from mlxc.model.dtype import apply_dtype

    model, tokenizer = mlx_load(path)
    apply_dtype(model, dtype)
    switch_in(model, kernel, fused)
    return (CompiledDecode(model) if compiled else model), tokenizer


def switch_in(model: Any, kernel: bool, fused: bool) -> None:
    """Stack `model`'s projections (once), then route them to mlxc's kernel (once)."""
    from mlxc.engine.cuda import fused_projections

    if fused and not getattr(model, "_bench_fused", False):
        fused_projections.fuse(model)
        model._bench_fused = True
    if kernel:
        quant_rows.install(model, force=True)


def experts(path: str) -> int:
    """The model's expert count from its config.json (0: a dense model)."""
    from pathlib import Path

    config = json.loads((Path(path) / "config.json").read_text())
    return int(config.get("num_experts") or config.get("n_routed_experts") or 0)


DECODE_VARIANTS = (  # name, dtype, kernel, fused, compiled: within a dtype, in the order
    # they are applied to one loaded model (stacking and the kernel are not undone)
    ("mlx-lm 4-bit", "keep", False, False, False),
    ("compiled 4-bit", "keep", False, False, True),
    ("stacked+compiled 4-bit", "keep", False, True, True),
    ("stacked+compiled+kernel 4-bit", "keep", True, True, True),
    ("stacked+compiled+kernel from 2 rows 4-bit", "keep", True, True, True),
    ("bfloat16 (dequantized)", "bfloat16", False, False, False),
    ("bfloat16 compiled", "bfloat16", False, False, True),
)


def part_decode(path: str, tokens: int, report: dict, repeat: int = 3,
                names: list[str] | None = None) -> None:
    from mlxc.engine.cuda.compiled_decode import CompiledDecode

    rows: dict = {}
    cuda = quant_rows.usable()
    chosen = [v for v in DECODE_VARIANTS if names is None or v[0] in names]
    if chosen[0][0] != "mlx-lm 4-bit":
        raise ValueError("the decode part needs 'mlx-lm 4-bit': the others are set against it")
    for dtype in dict.fromkeys(v[1] for v in chosen):
        started = time.perf_counter()
        model, tokenizer = load(path, dtype)
        print(f"[loaded --dtype {dtype} in {time.perf_counter() - started:.1f} s]", flush=True)
        for name, _, kernel, fused, compiled in (v for v in chosen if v[1] == dtype):
            if kernel and not cuda:
                print(f"{name:30s} left out: mlxc's kernel runs on CUDA only", flush=True)
                continue
            switch_in(model, kernel, fused)
            quant_rows.MIN_ROWS = 2 if "from 2 rows" in name else 1  # read as steps trace
            forward = CompiledDecode(model) if compiled else model
            rows[name] = {"one_stream": one_stream(forward, tokenizer, tokens, repeat),
                          "eight_streams": streams(forward, tokenizer, 8, tokens, repeat)}
            if compiled:
                rows[name]["compiled_failed"] = forward.failed
            print(f"{name:30s} one stream {rows[name]['one_stream']:7.1f} tok/s, "
                  f"8 streams {rows[name]['eight_streams']:7.1f} tok/s"
                  + (f" (compiled step off: {forward.failed})" if compiled and forward.failed
                     else ""), flush=True)
            del forward
        del model  # freed before the next dtype's copy loads (a 30B model: ~16 GiB each)
        mx.clear_cache()
    report["decode"] = rows
    raw = rows["mlx-lm 4-bit"]
    kept = {n: r for n, r in rows.items() if "4-bit" in n}
    best = max(kept.values(), key=lambda r: r["one_stream"])
    if experts(path):  # the MoE targets: 1.5x raw for one stream, 8 streams 4x one stream
        ratios = {n: r["eight_streams"] / r["one_stream"] for n, r in kept.items()}
        top = max(kept, key=lambda n: kept[n]["eight_streams"])
        report["moe_targets"] = {"one_stream_vs_raw": best["one_stream"] / raw["one_stream"],
                                 "eight_vs_one": ratios}
        print(f"MoE, best 4-bit one stream: {best['one_stream'] / raw['one_stream']:.2f}x raw "
              f"mlx-lm (target 1.5x); 8 streams over one stream: "
              + ", ".join(f"{n} {v:.2f}x" for n, v in ratios.items())
              + f" (target 4x; fastest 8 streams: {top}, {kept[top]['eight_streams']:.0f} tok/s)")
        return
    print(f"best 4-bit one stream: {best['one_stream'] / raw['one_stream']:.2f}x raw mlx-lm "
          f"(target 2.0x); best 4-bit 8 streams: "
          f"{max(r['eight_streams'] for r in kept.values()):.0f} tok/s "
          f"(target 1,500, and > bfloat16's "
          f"{rows.get('bfloat16 (dequantized)', {}).get('eight_streams', float('nan')):.0f})")


ENGINE_VARIANTS = "keep:off,keep:on,auto:on"  # --dtype : stacked projections


def part_engine(path: str, tokens: int, report: dict, repeat: int = 3,
                variants: str = ENGINE_VARIANTS, speculate: str = "") -> None:
    """mlxc's engine as `mlxc serve` runs it (defaults: compiled step, stacked projections,
    no prefix reuse here), one request and 8 at once, greedy, to `tokens` (ignore_eos);
    each variant under each `speculate` mode (comma-separated; default: MLXC_SPECULATE's)."""
    import tempfile
    from pathlib import Path

    from mlxc.config import load_settings
    from mlxc.engine.worker import Engine
    from mlxc.model.refs import resolve_model
    from mlxc.request import GenerationRequest

    def request(i: int) -> GenerationRequest:
        return GenerationRequest(messages=[{"role": "user", "content": f"Request {i}: " + " ".join(
            f"word{(i * 7 + j) % 97}" for j in range(gpu_streams.WORDS))}], max_tokens=tokens,
            ignore_eos=True)

    rows = {}
    modes = speculate.split(",") if speculate else [load_settings().speculate]
    for variant, mode in ((v, m) for v in variants.split(",") for m in modes):
        dtype, stacked = variant.split(":")
        fused = stacked == "on"
        settings = load_settings().with_overrides(
            cache_dir=Path(tempfile.mkdtemp(prefix="mlxc-gpu-")), model=path, dtype=dtype,
            prefix_memory_bytes=0, prefix_disk_bytes=0, fused_projections=fused,
            speculate=mode)
        engine = Engine(resolve_model(path, settings), settings).start()
        engine.wait_loaded()
        # warm-up: kernels compile and steps trace, lone and for the batch of 8 (MLX compiles
        # a CUDA kernel on its first use of a shape; the 8-stream figure must not hold that)
        engine.submit(request(0)).result()
        [g.result() for g in [engine.submit(request(90 + i)) for i in range(8)]]
        one = statistics.median(engine.submit(request(i)).result().tokens_per_second
                                for i in range(1, repeat + 1))
        eights = []
        for r in range(repeat):
            started = time.perf_counter()
            answers = [g.result() for g in [engine.submit(request(100 + 8 * r + i))
                                            for i in range(8)]]
            eights.append(sum(a.usage.completion_tokens for a in answers)
                          / (time.perf_counter() - started))
        name = f"engine --dtype {dtype} ({engine.dtype}), stacked {'on' if fused else 'off'}"
        name += f", speculation {settings.speculate}"
        figures = engine.figures()
        rows[name] = {"one_stream": one, "eight_streams_with_prefill": statistics.median(eights),
                      "figures": figures}
        print(f"{name:44s} one stream {one:7.1f} tok/s, 8 at once "
              f"{rows[name]['eight_streams_with_prefill']:7.1f} tok/s (prefills included, "
              f"{rows[name]['eight_streams_with_prefill'] / one:.2f}x); "
              f"compiled: {figures.get('compiled_decode')}; drafted/accepted "
              f"{figures['speculation']['drafted']}/{figures['speculation']['accepted']}, "
              f"gate's costs {figures['speculation'].get('step_costs')}", flush=True)
        engine.shutdown(wait=30)
        mx.clear_cache()
    report["engine"] = rows


def prefill_tps(model: Any, tokenizer: Any, length: int, repeat: int = 3) -> float:
    from mlx_lm import stream_generate

    speeds = []
    for i in range(repeat + 1):
        ids = [(7 * j + i) % 40000 + 100 for j in range(length)]
        *_, last = stream_generate(model, tokenizer, mx.array(ids), max_tokens=1)
        speeds.append(last.prompt_tps)
        mx.clear_cache()
    return statistics.median(speeds[1:])


def part_prefill(path: str, length: int, long_rows: list[int], report: dict) -> None:
    rows = {}
    model, tokenizer = load(path)
    rows["mlx-lm 4-bit"] = prefill_tps(model, tokenizer, length)
    quant_rows.install(model, force=quant_rows.usable())  # the long-prompt path: CUDA only
    for threshold in long_rows if quant_rows.usable() else ():
        quant_rows.LONG_ROWS = threshold
        rows[f"mlxc 4-bit, dequantize-then-GEMM from {threshold} rows"] = prefill_tps(
            model, tokenizer, length)
    del model
    mx.clear_cache()
    model, tokenizer = load(path, "bfloat16")
    rows["bfloat16 (dequantized)"] = prefill_tps(model, tokenizer, length)
    del model
    mx.clear_cache()
    for name, tps in rows.items():
        print(f"prefill {length:,} tokens, {name}: {tps:,.0f} tok/s "
              f"({tps / rows['mlx-lm 4-bit']:.2f}x raw)", flush=True)
    report["prefill"] = rows


def part_identity(path: str, prompts: int, tokens: int, report: dict,
                  kernel: bool = False) -> None:
    """Raw mlx-lm's greedy tokens against mlxc's decode (stacked projections under the
    compiled step, and the kernel with `kernel`)."""
    from mlx_lm import stream_generate

    from mlxc.engine.cuda import fused_projections
    from mlxc.engine.cuda.compiled_decode import CompiledDecode

    raw, tokenizer = load(path)
    model = raw

    def answer(i: int) -> list[tuple[int, Any]]:
        return [(r.token, r.logprobs) for r in stream_generate(
            model, tokenizer, mx.array(prompt_ids(tokenizer, 1000 + i, 8)), max_tokens=tokens)]

    alone = [answer(i) for i in range(prompts)]
    fused_projections.fuse(raw)
    if kernel:
        quant_rows.install(raw, force=True)
    model = CompiledDecode(raw)
    same, differences = 0, []
    for i in range(prompts):
        got = [t for t, _ in answer(i)]
        want = [t for t, _ in alone[i]]
        if got == want:
            same += 1
            continue
        at = next((j for j, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
                  min(len(got), len(want)))
        gap = None
        if at < min(len(got), len(want)):
            logprobs = alone[i][at][1]
            gap = (logprobs[want[at]] - logprobs[got[at]]).item()
        differences.append({"prompt": i, "position": at, "logit_gap": gap})
    report["identity"] = {"same": same, "prompts": prompts, "differences": differences,
                          "kernel": kernel, "compiled_failed": model.failed,
                          "compiled_lone_steps": model.lone_steps}
    print(f"greedy identity: {same}/{prompts} prompts identical over {tokens} tokens "
          f"(target >= 49); differences: {differences}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an MLX model folder (make_model.py OUT 3b, or OUT moe)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--blocks", default="4x4,8x4,2x4,4x2",
                        help="kernel block shapes to time, FEATURESxWARPS")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3,
                        help="timed runs of each figure, after one warm-up (median)")
    parser.add_argument("--words", type=int, default=gpu_streams.WORDS,
                        help="words in each decode/engine prompt (~3 tokens each)")
    parser.add_argument("--variants", help="decode variants to run, comma-separated (default "
                        "all): " + ", ".join(v[0] for v in DECODE_VARIANTS))
    parser.add_argument("--engine-variants", default=ENGINE_VARIANTS,
                        help="engine part: DTYPE:STACKED pairs, comma-separated")
    parser.add_argument("--speculate", default="",
                        help="engine part: speculation modes to run each variant under "
                        "(e.g. auto,off; default MLXC_SPECULATE's)")
    parser.add_argument("--prompt-tokens", type=int, default=20000)
    parser.add_argument("--long-rows", default="256,100000000",
                        help="dequantize-then-GEMM thresholds to time (a huge one: off)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--identity-kernel", action="store_true",
                        help="identity with mlxc's kernel too (default: stacked + compiled)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    parts = args.parts.split(",")
    gpu_streams.WORDS = args.words  # prompt_ids' and the engine's prompts
    names = args.variants.split(",") if args.variants else None
    unknown = set(names or ()) - {v[0] for v in DECODE_VARIANTS}
    if unknown:
        sys.exit(f"unknown --variants {sorted(unknown)}: choose from "
                 + ", ".join(v[0] for v in DECODE_VARIANTS))
    if not quant_rows.usable():
        if "kernels" in parts:
            sys.exit("the kernels part measures CUDA kernels: run it on the GPU machine")
        print("not CUDA: a check that the parts run on this model; its figures are not the "
              "GPU's", flush=True)
    report: dict = {"device": mx.device_info() if hasattr(mx, "device_info") else {}}
    steps = {
        "kernels": lambda: part_kernels(
            [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",")], report),
        "decode": lambda: part_decode(args.model, args.tokens, report, args.repeat, names),
        "engine": lambda: part_engine(args.model, args.tokens, report, args.repeat,
                                      args.engine_variants, args.speculate),
        "prefill": lambda: part_prefill(args.model, args.prompt_tokens,
                                        [int(v) for v in args.long_rows.split(",")], report),
        "identity": lambda: part_identity(args.model, args.prompts, args.tokens, report,
                                          args.identity_kernel),
    }
    for part in parts:
        started = time.perf_counter()
        try:
            steps[part]()
        except Exception as exc:  # one part failing must not lose the others' figures
            report.setdefault("errors", {})[part] = repr(exc)
            print(f"{part} failed: {exc!r}", flush=True)
        print(f"[{part}: {time.perf_counter() - started:.0f} s]", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()

"""Quantized models on CUDA (issue 24): each target beside raw mlx-lm on the same weights, medians
of one run. Parts (`--parts`, all by default):

- `kernels`: the device's copy bandwidth, then each 3B projection of 1-16 rows through MLX's
  `quantized_matmul` and mlxc's kernel (engine/cuda/quant_rows.py), chained as in a step;
- `decode`: one stream and 8 streams — raw mlx-lm (`stream_generate`, `BatchGenerator`) on the
  4-bit weights, the same with mlxc's kernel switched in, and dequantized to bfloat16;
- `prefill`: a 20,000-token prompt — raw mlx-lm, with the dequantize-then-GEMM path, bfloat16;
- `identity`: greedy tokens over 128 tokens on 50 prompts, kernel on against off (each
  difference with its logit gap).

Usage (GPU machine, ../shared/gpu/README.md):
  python3 .gpu/c2/make_model.py /tmp/m3b 3b
  python3 benchmarks/gpu_decode.py /tmp/m3b --json $OUT/gpu_decode.json
  python3 benchmarks/gpu_decode.py /tmp/m3b --parts kernels --blocks 4x4,8x4,2x4,4x2
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Any

import mlx.core as mx

from mlxc.engine.cuda import quant_rows

PARTS = ("kernels", "decode", "prefill", "identity")
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

        row[f"kernel_{block[0]}x{block[1]}_ms"] = median_time(lambda: chain(ours)) * 1e3
    row["best_ms"] = min(v for key, v in row.items() if key.startswith("kernel_"))
    return row


def load(path: str, dtype: str = "keep", kernel: bool = False) -> tuple[Any, Any]:
    from mlx_lm import load as mlx_load

    from mlxc.model.dtype import apply_dtype

    model, tokenizer = mlx_load(path)
    apply_dtype(model, dtype)
    if kernel:
        quant_rows.install(model, force=True)
    return model, tokenizer


def prompt_ids(tokenizer: Any, i: int, words: int = 24) -> list[int]:
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


def part_decode(path: str, tokens: int, report: dict) -> None:
    rows = {}
    variants = (("mlx-lm 4-bit", "keep", False), ("mlxc kernel 4-bit", "keep", True),
                ("bfloat16 (dequantized)", "bfloat16", False))
    for name, dtype, kernel in variants:
        model, tokenizer = load(path, dtype, kernel)
        rows[name] = {"one_stream": one_stream(model, tokenizer, tokens),
                      "eight_streams": streams(model, tokenizer, 8, tokens)}
        print(f"{name:24s} one stream {rows[name]['one_stream']:7.1f} tok/s, "
              f"8 streams {rows[name]['eight_streams']:7.1f} tok/s", flush=True)
        del model
        mx.clear_cache()
    report["decode"] = rows
    raw, ours = rows["mlx-lm 4-bit"], rows["mlxc kernel 4-bit"]
    print(f"one stream: {ours['one_stream'] / raw['one_stream']:.2f}x raw mlx-lm (target 2.0x); "
          f"8 streams: {ours['eight_streams']:.0f} tok/s (target 1,500, and > bfloat16's "
          f"{rows['bfloat16 (dequantized)']['eight_streams']:.0f})")


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
    quant_rows.install(model, force=True)
    for threshold in long_rows:
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


def part_identity(path: str, prompts: int, tokens: int, report: dict) -> None:
    from mlx_lm import stream_generate

    model, tokenizer = load(path)

    def answer(i: int) -> list[tuple[int, Any]]:
        return [(r.token, r.logprobs) for r in stream_generate(
            model, tokenizer, mx.array(prompt_ids(tokenizer, 1000 + i, 8)), max_tokens=tokens)]

    alone = [answer(i) for i in range(prompts)]
    quant_rows.install(model, force=True)
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
    quant_rows.uninstall(model)
    report["identity"] = {"same": same, "prompts": prompts, "differences": differences}
    print(f"greedy identity: {same}/{prompts} prompts identical over {tokens} tokens "
          f"(target >= 49); differences: {differences}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="an MLX model folder (make_model.py OUT 3b)")
    parser.add_argument("--parts", default=",".join(PARTS))
    parser.add_argument("--blocks", default="4x4,8x4,2x4,4x2",
                        help="kernel block shapes to time, FEATURESxWARPS")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=20000)
    parser.add_argument("--long-rows", default="256,100000000",
                        help="dequantize-then-GEMM thresholds to time (a huge one: off)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    if not quant_rows.usable():
        sys.exit("gpu_decode.py measures CUDA kernels: run it on the GPU machine")
    parts = args.parts.split(",")
    report: dict = {"device": mx.device_info() if hasattr(mx, "device_info") else {}}
    steps = {
        "kernels": lambda: part_kernels(
            [tuple(int(v) for v in b.split("x")) for b in args.blocks.split(",")], report),
        "decode": lambda: part_decode(args.model, args.tokens, report),
        "prefill": lambda: part_prefill(args.model, args.prompt_tokens,
                                        [int(v) for v in args.long_rows.split(",")], report),
        "identity": lambda: part_identity(args.model, args.prompts, args.tokens, report),
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

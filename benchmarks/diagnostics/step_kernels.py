"""Where one decode step's GPU time goes, kernel by kernel, under NVIDIA's Nsight Compute.

    ncu --profile-from-start off --cache-control none --clock-control none \\
        --metrics gpu__time_duration.sum --csv --print-units base \\
        python benchmarks/diagnostics/step_kernels.py --model PATH --rows 1,4,8 > kernels.csv 2>
            steps.txt
    python benchmarks/diagnostics/step_kernels.py --summarise kernels.csv --labels steps.txt

Runs, for each row count, one decode step of a float32-dequantized model (context ~200):
1 row as mlx-lm's lone step (`KVCache`), more through mlxc's compiled batched step over
`BatchKVCache`, with cuBLAS projections and then with mlxc's few-rows kernel. Only those
steps are profiled (`cuProfilerStart`), each after a marker kernel, so `--summarise` can
split the CSV into steps and sum each kernel name's device time per step.
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared.py


MARKER = "mlxc_step_marker"
PREFIX = "profiled step: "


def marker(label: str) -> None:
    """A tiny kernel whose name starts each profiled step in the CSV; the label goes to
    stderr in the same order."""
    import mlx.core as mx

    kernel = mx.fast.cuda_kernel(name=MARKER, input_names=["x"], output_names=["out"],
                                 source="out[0] = x[0];")
    (out,) = kernel(inputs=[mx.array([1.0])], output_shapes=[(1,)],
                    output_dtypes=[mx.float32], grid=(1, 1, 1), threadgroup=(1, 1, 1))
    mx.eval(out)
    print(f"{PREFIX}{label}", file=sys.stderr)


def profile(args) -> None:
    import mlx.core as mx
    from shared import batch_caches, filled, load_model, lone_caches, row_lengths

    from mlxc.engine.cuda.batch_kernels import BatchKernels
    from mlxc.engine.cuda.compiled_decode import CompiledDecode

    model = load_model(args.model)
    driver = ctypes.CDLL("libcuda.so.1")

    def steps(label: str, rows: int, forward) -> None:
        cache_of = lone_caches(model) if rows == 1 else batch_caches(model)
        caches = filled(model, cache_of, row_lengths(args.context, rows))
        y = mx.array([[1]] * rows)
        for _ in range(4):  # traced and warm before the profiled step
            y = mx.argmax(forward(y, cache=caches)[:, -1, :], axis=-1, keepdims=True)
            mx.eval(y)
        driver.cuProfilerStart()
        marker(label)
        mx.eval(mx.argmax(forward(y, cache=caches)[:, -1, :], axis=-1))
        driver.cuProfilerStop()

    for rows in [int(r) for r in args.rows.split(",")]:
        if rows == 1:
            steps("lone", 1, model)
            continue
        steps(f"{rows} rows, compiled, cuBLAS", rows, CompiledDecode(model))
        with BatchKernels(model):
            steps(f"{rows} rows, compiled, mlxc kernels", rows, CompiledDecode(model))


def summarise(path: str, labels: list[str]) -> dict:
    """{step label: {"total_us", kernels: {name: us}}} from ncu's CSV."""
    out, counts, current = {}, defaultdict(int), None
    with open(path, newline="") as f:
        rows = [r for r in csv.reader(f) if len(r) > 5]
    head = rows[0]
    name_at, metric_at, value_at = (head.index("Kernel Name"), head.index("Metric Name"),
                                    head.index("Metric Value"))
    for row in rows[1:]:
        if row[metric_at] != "gpu__time_duration.sum":
            continue
        name = row[name_at]
        if MARKER in name:
            current = labels[len(out)] if len(out) < len(labels) else f"step {len(out)}"
            out[current] = defaultdict(float)
            continue
        if current is not None:
            short = name.split("(")[0].split("<")[0][:60]
            out[current][short] += float(row[value_at].replace(",", "")) / 1000
            counts[current] += 1
    return {label: {"total_us": round(sum(k.values()), 1), "launches": counts[label],
                    "kernels": {n: round(us, 1) for n, us in
                                sorted(k.items(), key=lambda kv: -kv[1])[:12]}}
            for label, k in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--rows", default="1,4,8")
    parser.add_argument("--context", type=int, default=200)
    parser.add_argument("--summarise", metavar="CSV")
    parser.add_argument("--labels", help="the profiling run's stderr lines, one per step")
    args = parser.parse_args()
    if args.summarise:
        lines = open(args.labels).read().splitlines() if args.labels else []
        labels = [line[len(PREFIX):] for line in lines if line.startswith(PREFIX)]
        print(json.dumps(summarise(args.summarise, labels), indent=1))
    else:
        profile(args)


if __name__ == "__main__":
    main()

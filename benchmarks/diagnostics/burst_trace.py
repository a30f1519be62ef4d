"""Requests sent together to an idle engine: where their time goes, and what the compiled
decode step (engine/cuda/compiled_decode.py) changes, measured side by side in one process.

    python benchmarks/diagnostics/burst_trace.py [--model PATH] [--sizes 4,8] [--tokens 128]
        [--rounds 3]

For each size N and round: N requests one after another (the sequential sum, and one
stream's tokens/s), then N sent together in each mode (`--modes`; rounds rotate which goes
first): the compiled step as the engine runs it, mlx-lm's step, or the compiled step with
every projection by cuBLAS. Reports medians: wall / sequential sum, aggregate tokens/s over
one stream's, TTFT, the longest gap between two tokens of a stream; and the engine thread's
main steps timed (wall ms and calls, summed over rounds, per mode): admission of each
request (`_start_next`), the batch's prompt pass (`PromptProcessingBatch.prompt`), its
decode steps (`GenerationBatch._step`, inside `Scheduler._decode`), each sequence's token
handling (`Sequence.take`).
The machine's speed drifts (the H200's by up to a third between runs): compare modes only
within one run.
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared.py
from shared import gaps, prompt, timed, together, warm_engine

from mlxc.engine.worker import Engine

SPENT: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])


def timed_method(owner: type, name: str) -> None:
    original, label = getattr(owner, name), f"{owner.__name__}.{name}"

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            SPENT[label][0] += time.perf_counter() - started
            SPENT[label][1] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--sizes", default="4,8")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="compiled,plain",
                        help="compiled: the engine's step; plain: mlx-lm's (not compiled); "
                        "cublas: compiled, every projection by MLX's matmul")
    parser.add_argument("--block", help="FxW: the few-rows kernel's block shape for float32 "
                        "weights (mlxc/engine/cuda/small_rows.py BLOCKS)")
    args = parser.parse_args()
    if args.block:
        from mlxc.engine.cuda import small_rows

        small_rows.BLOCKS[4] = tuple(int(v) for v in args.block.split("x"))
    from mlx_lm.generate import GenerationBatch, PromptProcessingBatch

    from mlxc.engine.batch.lone import LoneDecoder
    from mlxc.engine.batch.scheduler import Scheduler
    from mlxc.engine.batch.sequence import Sequence
    from mlxc.engine.cuda.compiled_decode import CompiledDecode

    for owner, name in [(Scheduler, "_start_next"), (Scheduler, "_prefill"),
                        (Scheduler, "_decode"), (PromptProcessingBatch, "prompt"),
                        (GenerationBatch, "_step"), (LoneDecoder, "step"),
                        (Sequence, "take")]:
        timed_method(owner, name)
    engine = warm_engine(args.model)
    compiled = engine.batch_model
    if not isinstance(compiled, CompiledDecode):  # off a GPU: compare it all the same
        compiled = CompiledDecode(engine.model)
    modes = {name: mode(engine, name, compiled) for name in args.modes.split(",")}
    out: dict = {"device": str(__import__("mlx.core").core.default_device())}
    for size in [int(s) for s in args.sizes.split(",")]:
        rates = {name: defaultdict(list) for name in modes}
        steps = {name: defaultdict(lambda: [0.0, 0]) for name in modes}
        sequential = []
        for round_ in range(args.rounds + 1):  # round 0 traces new shapes: not counted
            requests = [prompt(8 * round_ + i).model_copy(update={"max_tokens": args.tokens})
                        for i in range(size)]
            use(engine, modes[next(iter(modes))])
            alone = [timed(engine, r) for r in requests]
            seq_sum = sum(f["e2e"] for f in alone)
            one_stream = sum(f["tokens"] for f in alone) / seq_sum
            names = list(modes)
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                use(engine, modes[name])
                SPENT.clear()
                wall, figures = together(engine, requests)
                if round_ == 0:
                    continue
                got = rates[name]
                got["ratio"].append(wall / seq_sum)
                got["vs_one_stream"].append(sum(f["tokens"] for f in figures) / wall / one_stream)
                got["ttft_p50_ms"].append(1000 * statistics.median(f["ttft"] for f in figures))
                got["wall"].append(wall)
                got["itl_max_ms"].append(1000 * max(
                    (max(gaps(f["times"]), default=0.0) for f in figures), default=0.0))
                for label, (seconds, calls) in SPENT.items():
                    steps[name][label][0] += seconds
                    steps[name][label][1] += calls
            if round_:
                sequential.append(seq_sum)
        out[size] = {"sequential_sum": round(statistics.median(sequential), 3),
                     **compiled.figures()}  # traces so far: new shapes cost the step a trace
        for name in modes:
            out[size][name] = {k: round(statistics.median(v), 3) for k, v in rates[name].items()}
            out[size][name]["steps"] = {k: {"ms": round(1000 * v[0], 1), "calls": v[1]}
                                        for k, v in sorted(steps[name].items())}
    engine.shutdown(wait=30)
    print(json.dumps(out, indent=1))


def mode(engine: Engine, name: str, compiled) -> tuple:
    """(what BatchGenerator calls, whether it runs compiled, the kernels' switch)."""
    from mlxc.engine.cuda.batch_kernels import BatchKernels
    from mlxc.engine.cuda.compiled_decode import CompiledDecode

    if name == "compiled":
        return compiled, True, engine.batch_kernels
    if name == "plain":
        return compiled, False, engine.batch_kernels
    if name == "cublas":  # its own traces: a graph keeps the projections it was traced with
        kernels = engine.batch_kernels
        cublas = BatchKernels(engine.model, max_rows=0) if isinstance(kernels, BatchKernels) \
            else kernels
        return CompiledDecode(engine.model), True, cublas
    raise SystemExit(f"unknown mode {name!r}: compiled, plain or cublas")


def use(engine: Engine, chosen: tuple) -> None:
    """Run the next requests in mode `chosen` (between them: the batch is empty)."""
    model, on, kernels = chosen

    def switch(e: Engine) -> None:
        model.on, e.batch_model, e.batch_kernels = on, model, kernels
        e.scheduler.batch = e.scheduler._new_batch()

    engine.call(switch).result()


if __name__ == "__main__":
    main()

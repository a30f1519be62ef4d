"""Requests sent together to an idle engine: where their time goes, and what the compiled
decode step (engine/compiled_decode.py) changes, measured side by side in one process.

    python benchmarks/burst_trace.py [--model PATH] [--sizes 4,8] [--tokens 128] [--rounds 3]

For each size N and round: N requests one after another (the sequential sum, and one
stream's tokens/s), then N sent together with the compiled step on, then off (rounds
alternate which goes first). Reports medians: wall / sequential sum, aggregate tokens/s over
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
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from concurrency import gaps, prompt, timed, together

from mlxc.config import load_settings
from mlxc.engine.worker import Engine
from mlxc.model.refs import resolve_model

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
    parser.add_argument("--block", help="FxW: the few-rows kernel's block shape for float32 "
                        "weights (mlxc/engine/small_rows.py BLOCKS)")
    args = parser.parse_args()
    if args.block:
        from mlxc.engine import small_rows

        small_rows.BLOCKS[4] = tuple(int(v) for v in args.block.split("x"))
    from mlx_lm.generate import GenerationBatch, PromptProcessingBatch

    from mlxc.engine.compiled_decode import CompiledDecode
    from mlxc.engine.lone import LoneDecoder
    from mlxc.engine.scheduler import Scheduler
    from mlxc.engine.sequence import Sequence

    for owner, name in [(Scheduler, "_start_next"), (Scheduler, "_prefill"),
                        (Scheduler, "_decode"), (PromptProcessingBatch, "prompt"),
                        (GenerationBatch, "_step"), (LoneDecoder, "step"),
                        (Sequence, "take")]:
        timed_method(owner, name)
    settings = load_settings().with_overrides(
        cache_dir=Path(tempfile.mkdtemp(prefix="mlxc-burst-")), model=args.model,
        prefix_memory_bytes=0, prefix_disk_bytes=0)
    engine = Engine(resolve_model(settings.model, settings), settings, max_batch=8,
                    max_queue=64).start()
    engine.wait_loaded()
    engine.call(lambda e: e.warm_up()).result()
    compiled = engine.batch_model
    if not isinstance(compiled, CompiledDecode):  # off a GPU: compare it all the same
        compiled = engine.batch_model = CompiledDecode(engine.model)
        engine.call(lambda e: setattr(e.scheduler, "batch", e.scheduler._new_batch())).result()
    out: dict = {"device": str(__import__("mlx.core").core.default_device())}
    for size in [int(s) for s in args.sizes.split(",")]:
        modes = {True: defaultdict(list), False: defaultdict(list)}
        steps = {True: defaultdict(lambda: [0.0, 0]), False: defaultdict(lambda: [0.0, 0])}
        sequential = []
        for round_ in range(args.rounds + 1):  # round 0 traces new shapes: not counted
            requests = [prompt(8 * round_ + i).model_copy(update={"max_tokens": args.tokens})
                        for i in range(size)]
            alone = [timed(engine, r) for r in requests]
            seq_sum = sum(f["e2e"] for f in alone)
            one_stream = sum(f["tokens"] for f in alone) / seq_sum
            for on in ((True, False) if round_ % 2 else (False, True)):
                compiled.on = on
                SPENT.clear()
                wall, figures = together(engine, requests)
                if round_ == 0:
                    continue
                rates = modes[on]
                rates["ratio"].append(wall / seq_sum)
                rates["vs_one_stream"].append(sum(f["tokens"] for f in figures) / wall
                                              / one_stream)
                rates["ttft_p50_ms"].append(1000 * statistics.median(f["ttft"] for f in figures))
                rates["wall"].append(wall)
                rates["itl_max_ms"].append(1000 * max(
                    (max(gaps(f["times"]), default=0.0) for f in figures), default=0.0))
                for label, (seconds, calls) in SPENT.items():
                    steps[on][label][0] += seconds
                    steps[on][label][1] += calls
            if round_:
                sequential.append(seq_sum)
        compiled.on = True
        out[size] = {"sequential_sum": round(statistics.median(sequential), 3),
                     **compiled.figures()}  # traces so far: new shapes cost the step a trace
        for on, name in ((True, "compiled"), (False, "plain")):
            out[size][name] = {k: round(statistics.median(v), 3) for k, v in modes[on].items()}
            out[size][name]["steps"] = {k: {"ms": round(1000 * v[0], 1), "calls": v[1]}
                                        for k, v in sorted(steps[on].items())}
    engine.shutdown(wait=30)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

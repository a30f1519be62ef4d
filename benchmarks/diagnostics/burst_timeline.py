"""What the engine thread does from a burst's first request to its last first token, in order.

    python benchmarks/diagnostics/burst_timeline.py [--model PATH] [--sizes 8] [--tokens 32]
        [--rounds 2]

Sends N requests at once from N threads (as `concurrency.py` does) to an idle, warmed-up
engine and prints, per round, a timeline relative to the first `submit`: when each request
was submitted and got its first token, and each engine step that ran in between (admission,
prompt chunks, the batch's prompt pass and decode steps, compiled traces), with its duration.
Host times: MLX evaluates lazily, so GPU work shows up in the step that waits for it.
"""

from __future__ import annotations

import argparse
import functools
import sys
import threading
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared.py
from shared import prompt, warm_engine

from mlxc.engine.worker import Engine
from mlxc.stream import Delta

EVENTS: list[tuple[float, float, str, str]] = []  # (start, end, what, detail)
LOCK = threading.Lock()
SYNC = False  # --sync: each traced step waits for the GPU before and after it


def note(start: float, end: float, what: str, detail: str = "") -> None:
    with LOCK:
        EVENTS.append((start, end, what, detail))


def traced(owner: type | types.ModuleType, name: str, detail=lambda *a, **k: "") -> None:
    original, label = getattr(owner, name), f"{owner.__name__}.{name}"
    import mlx.core as mx

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        said = detail(*args, **kwargs)
        if SYNC:
            mx.synchronize()
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            if SYNC:
                mx.synchronize()
            note(started, time.perf_counter(), label, said)

    setattr(owner, name, wrapper)


def instrument() -> None:
    from mlx_lm.generate import GenerationBatch, PromptProcessingBatch

    from mlxc.engine.batch.lone import LoneDecoder
    from mlxc.engine.batch.scheduler import Scheduler
    from mlxc.engine.cuda import compiled_decode
    from mlxc.engine.cuda.compiled_decode import CompiledDecode

    traced(Scheduler, "_admit_burst", lambda s, room: f"waiting {len(s.waiting)}")
    traced(Scheduler, "_prefill_next", lambda s, seq: "lone way" if seq else "none")
    traced(Scheduler, "_prefill", lambda s: f"{s.prefilling.prefill.next_tokens()} tokens")
    traced(Scheduler, "_release", lambda s: f"{len(s.ready)} ready")
    traced(Scheduler, "_join", lambda s, seqs: f"{len(seqs)} join")
    traced(Scheduler, "_decode_lone")
    traced(Scheduler, "_decode", lambda s: f"{len(s.running)} running")
    traced(Scheduler, "_start_next")
    traced(PromptProcessingBatch, "prompt",
           lambda s, tokens: f"{len(tokens)} x {max(map(len, tokens), default=0)}")
    traced(GenerationBatch, "__init__", lambda s, model, uids, *a, **k: f"{len(uids)} rows")
    traced(GenerationBatch, "_step")
    traced(LoneDecoder, "__init__")
    traced(PromptProcessingBatch, "split")
    traced(PromptProcessingBatch, "generate")
    traced(GenerationBatch, "extend")
    traced(sys.modules["mlx_lm.generate"], "_merge_caches")  # the package's `generate` is
    # the function of that name
    traced(compiled_decode, "_make_room")
    traced(CompiledDecode, "__call__",
           lambda s, inputs, cache=None, **k: f"{inputs.shape} traces so far {s.traces}")


def burst(engine: Engine, requests: list) -> tuple[list[float], list[float]]:
    """(submit times, first-token times) of requests sent together, one thread each."""
    submitted, first = [0.0] * len(requests), [0.0] * len(requests)

    def run(i: int) -> None:
        submitted[i] = time.perf_counter()
        generation = engine.submit(requests[i])
        for event in generation.events():
            if isinstance(event, Delta) and not first[i]:
                first[i] = time.perf_counter()
        generation.result()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return submitted, first


def show(submitted: list[float], first: list[float]) -> None:
    zero, last = min(submitted), max(first)
    rows = [(s, s, f"submit #{i}", "") for i, s in enumerate(submitted)]
    rows += [(f, f, f"first token #{i}", "") for i, f in enumerate(first)]
    rows += [e for e in EVENTS if zero <= e[0] <= last]
    for start, end, what, detail in sorted(rows):
        took = f"{1000 * (end - start):7.2f} ms" if end > start else " " * 10
        print(f"{1000 * (start - zero):8.2f} {took}  {what} {detail}")
    print(f"first tokens: {sorted(round(1000 * (f - zero), 1) for f in first)} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--sizes", default="8")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--sync", action="store_true",
                        help="wait for the GPU around each traced step: its GPU work is then "
                        "in its own time (the steps no longer overlap)")
    args = parser.parse_args()
    global SYNC
    SYNC = args.sync
    engine = warm_engine(args.model)
    instrument()
    for size in [int(s) for s in args.sizes.split(",")]:
        for round_ in range(args.rounds):
            requests = [prompt(8 * round_ + i).model_copy(update={"max_tokens": args.tokens})
                        for i in range(size)]
            EVENTS.clear()
            submitted, first = burst(engine, requests)
            print(f"\n== {size} requests, round {round_} ==")
            show(submitted, first)
    engine.shutdown(wait=30)


if __name__ == "__main__":
    main()

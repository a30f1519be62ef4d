"""Does a lone request decode slower after batches have run, or when a thread reads it?

    python benchmarks/diagnostics/lone_after_batch.py [--model PATH] [--tokens 128] [--bursts 3]

Median gap between a lone request's tokens (`concurrency.py`'s prompt 10), read by the main
thread and by a thread of its own, on a fresh engine, then again after `--bursts` bursts of 4
requests sent together (as `concurrency.py` runs before its level 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared.py
from shared import gaps, prompt, timed, together, warm_engine

from mlxc.engine.worker import Engine


def itl_ms(engine: Engine, tokens: int, threaded: bool, rounds: int = 3) -> float:
    request = prompt(10).model_copy(update={"max_tokens": tokens})
    runs = [together(engine, [request])[1][0] if threaded else timed(engine, request)
            for _ in range(rounds)]
    return round(1000 * statistics.median(g for f in runs for g in gaps(f["times"])), 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--bursts", type=int, default=3)
    args = parser.parse_args()
    engine = warm_engine(args.model)
    out = {"fresh": {"main": itl_ms(engine, args.tokens, False),
                     "thread": itl_ms(engine, args.tokens, True)}}
    four = [prompt(i).model_copy(update={"max_tokens": args.tokens}) for i in range(4)]
    for _ in range(args.bursts):
        together(engine, four)
    out["after_bursts"] = {"main": itl_ms(engine, args.tokens, False),
                           "thread": itl_ms(engine, args.tokens, True)}
    out["after_bursts"]["main_again"] = itl_ms(engine, args.tokens, False)
    print(json.dumps(out))
    engine.shutdown(wait=30)


if __name__ == "__main__":
    main()

"""One request at a time: mlxc's decode speed against raw mlx-lm's, per prompt.

    python benchmarks/diagnostics/lone_prompts.py [--model PATH] [--prompts 0,10,11] [--tokens 128]
                                      [--rounds 3]

For each prompt of `concurrency.py` and round (alternating): raw `mlx_lm.stream_generate`'s
generation tokens/s, then mlxc's (tokens after the first over the time from the first to the
last, as the engine times it), with the engine thread's host time per call in
`Sequence.take` (text, stops, the answer's parsers) and `LoneDecoder.step`. Medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from burst_trace import SPENT, timed_method

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: shared.py
from shared import prompt, raw_decode_tps, warm_engine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model")
    parser.add_argument("--prompts", default="0,10,11")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from mlxc.engine.batch.lone import LoneDecoder
    from mlxc.engine.batch.sequence import Sequence

    timed_method(Sequence, "take")
    timed_method(LoneDecoder, "step")
    engine = warm_engine(args.model)
    got: dict = defaultdict(lambda: defaultdict(list))
    for _ in range(args.rounds):
        for i in [int(p) for p in args.prompts.split(",")]:
            request = prompt(i).model_copy(update={"max_tokens": args.tokens})
            got[i]["mlx_lm"].append(
                engine.call(lambda e, r=request: raw_decode_tps(e, r, args.tokens)).result())
            SPENT.clear()
            answer = engine.submit(request).result()
            made, seconds = answer.usage.completion_tokens, answer.generation_seconds
            got[i]["mlxc"].append((made - 1) / seconds if seconds else 0.0)
            got[i]["tokens"].append(made)
            for label, (spent, calls) in SPENT.items():
                got[i][f"{label} ms/call"].append(1000 * spent / max(calls, 1))
    out = {i: {k: round(statistics.median(v), 3) for k, v in figures.items()}
           for i, figures in got.items()}
    for figures in out.values():
        figures["ratio"] = round(figures["mlxc"] / figures["mlx_lm"], 3)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

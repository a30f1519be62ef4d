"""How much prompt lookup could gain on the code-edit and chat requests of
benchmarks/speculative.py, whatever the gate decides: the greedy answers are generated once
(speculation off), then each is replayed through the drafter's own lookup (decode/speculate.py
`Drafter`, longest suffix first; for the edits also with the original file as a prediction)
with an oracle gate that drafts only where the draft's first token is taken. Each pass
is charged verify(k)/plain from `--costs` (benchmarks/diagnostics/verify_cost.py's table for
this machine); a plain step costs 1. The ratio is the ceiling of what the real gate reaches,
since the real one cannot know in advance which drafts are taken.

    python benchmarks/diagnostics/lookup_ceiling.py [--max-tokens 160] [--ks 2,4,8,12]
        [--costs 1:1.17,2:1.27,4:1.47,8:1.80,12:2.17] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from speculative import CHATS, FILES, edit, engine_for, source_of  # noqa: E402

from mlxc.engine.decode.speculate import Drafter  # noqa: E402
from mlxc.request import GenerationRequest  # noqa: E402


def cost_of(k: int, table: dict[int, float]) -> float:
    """verify(k)/plain, linear between the measured lengths (k = 0: a plain step)."""
    points = sorted({0: 1.0, **table}.items())
    for (a, ca), (b, cb) in zip(points, points[1:], strict=False):
        if a <= k <= b:
            return ca + (cb - ca) * (k - a) / (b - a)
    return points[-1][1]


def replay(prompt: list[int], answer: list[int], prediction: list[int] | None, longest: int,
           table: dict[int, float]) -> dict:
    """The answer decoded with oracle-gated lookup drafts of up to `longest` tokens."""
    drafter = Drafter(prompt, prediction, ngram=True)
    i, cost, drafted, taken = 1, 0.0, 0, 0
    while i < len(answer):
        drafter.catch_up(prompt + answer[: i - 1])  # the pending token answer[i-1] is not
        run = drafter._looked_up(answer[i - 1], longest, ngram=True)  # fed yet
        agreed = 0
        while agreed < len(run) and i + agreed < len(answer) and run[agreed] == answer[i + agreed]:
            agreed += 1
        k = len(run) if agreed else 0
        cost += cost_of(k, table)
        drafted, taken = drafted + k, taken + agreed
        new = answer[i : i + agreed + 1]
        i += len(new)
    return {"ceiling": round((len(answer) - 1) / max(cost, 1e-9), 3),
            "accepted": taken, "drafted": drafted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--ks", default="2,4,8,12", help="longest draft lengths to replay")
    parser.add_argument("--costs", default="1:1.17,2:1.27,4:1.47,8:1.80,12:2.17",
                        help="k:verify/plain pairs (verify_cost.py on this machine)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    table = {int(k): float(v) for k, v in (p.split(":") for p in args.costs.split(","))}
    requests = [(f"edit {p}", edit(p, c, args.max_tokens, False, {}), source_of(p))
                for p, c in FILES.items()]
    requests += [(f"chat {c[:30]}", GenerationRequest(
        messages=[{"role": "user", "content": c}], max_tokens=args.max_tokens), None)
        for c in CHATS]
    engine = engine_for("off")
    report = []
    try:
        tokenizer = engine.call(lambda e: e.tokenizer).result()
        for name, request, source in requests:
            answer = engine.submit(request).result()
            prompt = engine.call(lambda e, r=request: e.encode(r)).result()
            tokens = tokenizer.encode(answer.text, add_special_tokens=False)
            row = {"request": name, "tokens": len(tokens), "answer_start": answer.text[:80]}
            for k in map(int, args.ks.split(",")):
                row[f"lookup_k{k}"] = replay(prompt, tokens, None, k, table)
                if source:
                    row[f"prediction_k{k}"] = replay(prompt, tokens, tokenizer.encode(
                        source, add_special_tokens=False), k, table)
            report.append(row)
            if not args.json:
                best = max(v["ceiling"] for key, v in row.items() if key.startswith("lookup"))
                print(f"{name}: {len(tokens)} tokens, lookup ceiling {best:.2f}x "
                      f"({row['answer_start']!r})", flush=True)
    finally:
        engine.shutdown(wait=30)
    if args.json:
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

"""Speculative decoding (issue 25): tokens/s of code-edit tasks (the prompt holds a 60-150-line
source file of this repo, the request asks for it back with a small change) and of free-form
chat, with speculation off, with prompt lookup (auto), and with `prediction` set to the
original file; one engine per mode, taken in turns request by request (each request `--rounds`
times), medians and ratios. With `--temperature T` (top-p 0.9 with it) the requests are sampled
and speculate by rejection sampling (engine/decode/rejection.py): answers differ run to run, so
"identical" is left out and the acceptance rate says what speculation did.

With `--concurrency N`, N code-edit streams at once through one engine (the batch: each row
verifies its own draft, engine/batch/speculative.py), speculation off, auto, and auto with
`prediction` set to the original file, taken in turns `--rounds` times: aggregate tokens/s
(all streams' tokens over the wall time from the first submit to the last answer, prefills
included) and the decode part alone (tokens after each stream's first one, over the time
from the first first token to the last answer), medians.

    .venv/bin/python benchmarks/speculative.py [--max-tokens 160] [--rounds 3]
        [--temperature 0.7] [--concurrency 4 [--predict-answer] [--warm]] [--json]
        [--draft-model PATH|self|layers:0-3,24-29 [--no-peer]]

With `--draft-model`, single streams: off, auto without a draft model (prompt lookup), draft
(`--speculate draft`: the draft model only) and auto with the draft model, then mlx_lm.server
plain and with the same draft model (benchmarks/draft_peer.py). `self`: the model drafts for
itself (every draft is taken: the mechanism's upper bound, at a draft that costs as much as
the model); `layers:...`: a draft cut from the model, those of its layers kept (the only
real model here is SmolLM2-135M, so the draft must come from it: tests/draft_maker.py).

The model is mlxc's (MLXC_MODEL picks another, e.g. a GPU's random-weight 3B: there prompt
lookup finds little, and `--predict-answer` measures what the batch gains from drafts taken).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mlxc.config import load_settings
from mlxc.engine.worker import Engine
from mlxc.model.refs import resolve_model
from mlxc.request import GenerationRequest

ROOT = Path(__file__).resolve().parent.parent
FILES = {  # file -> the small change asked for
    "mlxc/engine/decode/stops.py": "rename the class StopFilter to StopStrings",
    "mlxc/engine/decode/seeds.py": "add a one-line comment at the top of the file",
    "mlxc/engine/batch/figures.py": "rename RATE_WINDOW to WINDOW_SECONDS",
}
# The files as of this commit: the workload must not change when the code does (figures.py
# grew in 7 Dec's work, and its edit drafted 30 tokens where it had drafted ~105).
SOURCE_REVISION = "61bb135"
CHATS = ["Write a short story about a lighthouse keeper.", "Explain how rainbows form."]


def source_of(path: str) -> str:
    """`path` at SOURCE_REVISION (the working copy where git or that commit is missing)."""
    import subprocess

    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{SOURCE_REVISION}:{path}"],
                           capture_output=True, text=True)
    return shown.stdout if shown.returncode == 0 else (ROOT / path).read_text()


def edit(path: str, change: str, max_tokens: int, predicted: bool,
         sampling: dict) -> GenerationRequest:
    source = source_of(path)
    text = f"Here is {path}:\n```python\n{source}```\nGive back the whole file, with one " \
           f"change: {change}. Answer with the file only."
    return GenerationRequest(messages=[{"role": "user", "content": text}],
                             max_tokens=max_tokens, prediction=source if predicted else None,
                             **sampling)


SPECULATION: dict = {}  # each plan's engine's /health speculation figures, after `run`
_CACHE_DIR: list[str] = []  # one for every engine: the memory gate is measured once


def engine_for(mode: str, draft: str | None = None) -> Engine:
    _CACHE_DIR[:] = _CACHE_DIR or [tempfile.mkdtemp()]  # (no prefix or response cache in it)
    settings = load_settings().with_overrides(
        cache_dir=_CACHE_DIR[0], speculate=mode, prefix_memory_bytes=0,
        prefix_disk_bytes=0, cache_policy="off", draft_model=draft)
    engine = Engine(resolve_model(settings.model, settings), settings).start()
    engine.wait_loaded()
    return engine


def run(plans: dict[str, tuple[str, list[GenerationRequest]]], rounds: int,
        drafts: dict[str, str] | None = None, engines: dict | None = None) -> dict:
    """Each plan (name -> (mode, requests)) on its own engine (with `drafts[name]` as its
    draft model, or `engines[name]` where given: a peer), taken in turns request by request, so
    a shared machine's load falls on every mode alike: name -> [(answer, median tokens/s over
    `rounds` passes)] per request."""
    drafts = drafts or {}
    engines = {name: (engines or {}).get(name) or engine_for(mode, drafts.get(name))
               for name, (mode, _) in plans.items()}
    results: dict[str, list] = {name: [] for name in plans}
    try:
        for i in range(max(len(requests) for _, requests in plans.values())):
            runs: dict[str, list] = {name: [] for name, (_, r) in plans.items() if i < len(r)}
            for _ in range(rounds):
                for name in runs:
                    runs[name].append(engines[name].submit(plans[name][1][i]).result())
            for name, answers in runs.items():
                speed = statistics.median(a.tokens_per_second for a in answers)
                results[name].append((answers[-1], speed))
                print(f"request {i}, {name}: {speed:.1f} tok/s, accepted/drafted "
                      f"{answers[-1].usage.accepted_tokens}/{answers[-1].usage.drafted_tokens}",
                      file=sys.stderr, flush=True)
    finally:
        for name, engine in engines.items():
            SPECULATION[name] = engine.figures().get("speculation")
            engine.shutdown(wait=30)
    return results


CHANGES = ["add a one-line comment at the top of the file", "add a blank line at the end",
           "add a comment above the first import"]  # more streams than files: other asks


def concurrent(n: int, max_tokens: int, rounds: int, sampling: dict,
               predict_answer: bool = False, warm: bool = False) -> dict:
    """N code-edit streams at once, off and auto in turns: aggregate tokens/s (wall and
    decode part), medians over the rounds, and whether the answers matched.
    `predict_answer`: the prediction is each stream's own plain answer (of the round's off
    pass): drafts a model of any skill takes, random weights too. `warm`: an untimed
    round first (a fresh CUDA process compiles its kernels)."""
    paths = list(FILES)
    asks = [(paths[i % len(paths)], FILES[paths[i % len(paths)]] if i < len(paths)
             else CHANGES[(i // len(paths) - 1) % len(CHANGES)]) for i in range(n)]
    plans = {"off": False, "auto": False, "prediction": True}  # mode -> with `prediction`
    requests = {m: [edit(p, c, max_tokens, predicted, sampling) for p, c in asks]
                for m, predicted in plans.items()}
    engines = {mode: engine_for("off" if mode == "off" else "auto") for mode in plans}
    runs: dict[str, list] = {mode: [] for mode in engines}
    latest: dict[str, list] = {}  # each mode's answers of its last pass
    try:
        for round_ in range(rounds + warm):
            for mode, engine in engines.items():
                if mode == "prediction" and predict_answer:
                    requests[mode] = [r.model_copy(update={"prediction": a.text}) for r, a
                                      in zip(requests["auto"], latest["off"], strict=True)]
                started = time.perf_counter()
                generations = [engine.submit(r) for r in requests[mode]]
                answers = [g.result() for g in generations]
                wall = time.perf_counter() - started
                tokens = sum(a.usage.completion_tokens for a in answers)
                first = min(a.prefill_seconds for a in answers)  # from its own start (~submit)
                latest[mode] = answers
                if round_ >= warm:
                    runs[mode].append({"answers": answers, "wall": tokens / wall,
                                       "decode": (tokens - n) / max(wall - first, 1e-9)})
    finally:
        for engine in engines.values():
            engine.shutdown(wait=30)
    report = {mode: {"aggregate_tok_s": statistics.median(r["wall"] for r in rs),
                     "decode_tok_s": statistics.median(r["decode"] for r in rs)}
              for mode, rs in runs.items()}
    last = {mode: rs[-1]["answers"] for mode, rs in runs.items()}
    report["ratios"] = {f"{m}_{k}": report[m][k] / report["off"][k]
                        for m in ("auto", "prediction")
                        for k in ("aggregate_tok_s", "decode_tok_s")}
    report["identical"] = [a.text == b.text for m in ("auto", "prediction")
                           for a, b in zip(last["off"], last[m], strict=True)]
    report["acceptance"] = {m: [(a.usage.accepted_tokens, a.usage.drafted_tokens)
                                for a in last[m]] for m in ("auto", "prediction")}
    report["concurrency"], report["temperature"] = n, sampling.get("temperature", 0.0)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=160)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="passes of each request")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="sample at this temperature (top-p 0.9), no seed")
    parser.add_argument("--concurrency", type=int, default=0,
                        help="N code-edit streams at once, off vs auto (the batch)")
    parser.add_argument("--predict-answer", action="store_true", help="with --concurrency: "
                        "predict each stream's own plain answer, not the original file")
    parser.add_argument("--warm", action="store_true", help="an untimed round first")
    parser.add_argument("--draft-model", help="single streams with this draft model (a "
                        "folder, self, or layers:0-3,24-29 cut from the model), beside "
                        "mlx_lm.server's draft-model mode")
    parser.add_argument("--no-peer", action="store_true", help="with --draft-model: leave "
                        "mlx_lm.server out")
    parser.add_argument("--num-draft", type=int, default=3,
                        help="mlx_lm.server's --num-draft-tokens (its default: 3)")
    args = parser.parse_args()
    sampling = {"temperature": args.temperature, "top_p": 0.9} if args.temperature else {}
    if args.draft_model:
        from speculative_draft import with_draft_model

        with_draft_model(args, run, [edit(p, c, args.max_tokens, False, sampling)
                                for p, c in FILES.items()],
                         [GenerationRequest(messages=[{"role": "user", "content": c}],
                                            max_tokens=args.max_tokens, **sampling)
                          for c in CHATS], SPECULATION)
        return
    if args.concurrency:
        report = concurrent(args.concurrency, args.max_tokens, args.rounds, sampling,
                            args.predict_answer, args.warm)
        if args.json:
            print(json.dumps(report, indent=1))
            return
        ratios = report["ratios"]
        for part in ("aggregate_tok_s", "decode_tok_s"):
            print(f"{args.concurrency} code-edit streams at once, {part}: off "
                  f"{report['off'][part]:.1f}, auto {report['auto'][part]:.1f} "
                  f"({ratios['auto_' + part]:.2f}x), prediction "
                  f"{report['prediction'][part]:.1f} ({ratios['prediction_' + part]:.2f}x)")
        print(f"identical answers: {sum(report['identical'])} of {len(report['identical'])}; "
              f"accepted/drafted: {report['acceptance']}")
        return
    plain_edits = [edit(p, c, args.max_tokens, False, sampling) for p, c in FILES.items()]
    predicted = [edit(p, c, args.max_tokens, True, sampling) for p, c in FILES.items()]
    chats = [GenerationRequest(messages=[{"role": "user", "content": c}],
                               max_tokens=args.max_tokens, **sampling) for c in CHATS]
    results = run({"off": ("off", plain_edits + chats), "auto": ("auto", plain_edits + chats),
                   "auto+prediction": ("auto", predicted)}, args.rounds)
    rows = {name: [answer for answer, _ in pairs] for name, pairs in results.items()}
    speeds = {name: [speed for _, speed in pairs] for name, pairs in results.items()}
    off, auto, pred = rows["off"], rows["auto"], rows["auto+prediction"]
    n = len(FILES)

    def med(name, part):
        return statistics.median(speeds[name][part])

    report = {
        "edit_tok_s": {"off": med("off", slice(0, n)), "auto": med("auto", slice(0, n)),
                       "prediction": med("auto+prediction", slice(0, n))},
        "chat_tok_s": {"off": med("off", slice(n, None)), "auto": med("auto", slice(n, None))},
        "identical": [a.text == b.text for a, b in zip(off, auto, strict=True)]
        + [a.text == b.text for a, b in zip(off[:n], pred, strict=True)],
        "acceptance": {m: [(a.usage.accepted_tokens, a.usage.drafted_tokens) for a in rows[m]]
                       for m in rows},
        "acceptance_rate": {m: _rate(rows[m][:n], rows[m][n:])
                            for m in ("auto", "auto+prediction")},
        "temperature": args.temperature,
    }
    e, c = report["edit_tok_s"], report["chat_tok_s"]
    report["ratios"] = {"edit_auto": e["auto"] / e["off"], "edit_prediction":
                        e["prediction"] / e["off"], "chat_auto": c["auto"] / c["off"]}
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"code edit tok/s (median of {n}): off {e['off']:.1f}, auto {e['auto']:.1f} "
          f"({report['ratios']['edit_auto']:.2f}x), prediction {e['prediction']:.1f} "
          f"({report['ratios']['edit_prediction']:.2f}x)")
    print(f"chat tok/s (median of {len(CHATS)}): off {c['off']:.1f}, auto {c['auto']:.1f} "
          f"({report['ratios']['chat_auto']:.2f}x)")
    if args.temperature:
        print(f"sampled at temperature {args.temperature}, top-p 0.9: acceptance (edit, chat) "
              f"{report['acceptance_rate']}")
    else:
        print(f"identical answers: {sum(report['identical'])} of {len(report['identical'])}")
    print("accepted/drafted:", report["acceptance"])


def _rate(*parts: list) -> list[float | None]:
    """Accepted / drafted over each part's answers (the last pass of each request)."""
    rates = []
    for answers in parts:
        drafted = sum(a.usage.drafted_tokens for a in answers)
        rates.append(round(sum(a.usage.accepted_tokens for a in answers) / drafted, 3)
                     if drafted else None)
    return rates


if __name__ == "__main__":
    main()

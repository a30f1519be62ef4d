"""How fast a model runs on MLX's CPU backend with and without an optimised BLAS and float32.

Each setup runs in its own process, because the BLAS has to be loaded before `import mlx.core`:
  naive     MLX's bundled reference BLAS, weights as shipped (quantized)
  blas      load_optimised_blas(), weights as shipped
  blas+f32  load_optimised_blas(), weights dequantized to float32
  auto      load_optimised_blas() + apply_dtype(choose_dtype("auto")): what mlxc does

It reports prefill tokens/s per prompt length, decode tokens/s, ratios to naive, whether the
greedy answers to two short prompts match the naive (quantized) model's, and for "auto" the
prefill speed per prefill_step_size.

  python benchmarks/cpu_speed.py --model ~/models/SmolLM2-135M-Instruct
  python benchmarks/cpu_speed.py --model DIR --lengths 40,500 --setups naive,auto --json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout too

SETUPS = {  # name: (MLXC_BLAS override, dtype)
    "naive": ("none", "keep"),
    "blas": (None, "keep"),
    "blas+f32": (None, "float32"),
    "auto": (None, "auto"),
}
QUESTIONS = ["What is the capital of France?", "Name three primary colours."]
FILLER = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of "
    "France. MLX is an array framework for machine learning on Apple silicon. "
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", required=True, help="an MLX model folder")
    p.add_argument("--setups", default=",".join(SETUPS), help="comma-separated, from: %(default)s")
    p.add_argument("--lengths", default="40,500,2000", help="prompt lengths in tokens")
    p.add_argument("--decode", type=int, default=64, help="tokens generated to time decoding")
    p.add_argument("--answer-tokens", type=int, default=24, help="greedy tokens compared")
    p.add_argument("--prefill-step", type=int, default=512, help="prefill_step_size for timings")
    p.add_argument("--steps", default="128,256,512,2048", help="prefill_step_size values tried")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure one setup
    args = p.parse_args()
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    results = []
    for name in args.setups.split(","):
        if name not in SETUPS:
            p.error(f"unknown setup {name!r}")
        print(f"measuring {name} ...", file=sys.stderr, flush=True)
        results.append(run_setup(name, args))
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        report(results)


def run_setup(name: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    blas, _ = SETUPS[name]
    if blas is not None:
        env["MLXC_BLAS"] = blas
    cmd = [sys.executable, __file__, "--worker", name] + [
        f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("worker", "json", "setups")
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"{name} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(name: str, args: argparse.Namespace) -> dict:
    from mlxc.model.blas import load_optimised_blas

    blas = load_optimised_blas()  # first: before anything imports mlx.core
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    from mlxc.model.dtype import apply_dtype, choose_dtype, float32_bytes

    started = time.perf_counter()
    model, tokenizer = load(args.model)
    dtype = SETUPS[name][1]
    if dtype == "auto":
        dtype = choose_dtype("auto", float32_bytes(Path(args.model)))
    apply_dtype(model, dtype)
    load_s = time.perf_counter() - started
    greedy = make_sampler(temp=0.0)
    eos = mx.array(sorted(tokenizer.eos_token_ids))

    def no_eos(_tokens, logits):  # decode timing needs a fixed length, whatever the model says
        logits[:, eos] = -float("inf")
        return logits

    base = tokenizer.encode(FILLER * 2, add_special_tokens=False)

    def prompt(n: int) -> list[int]:
        return (base * (n // len(base) + 1))[:n]

    def prefill_tps(n: int, step: int) -> float:
        best = 0.0
        for _ in range(3 if n <= 100 else 1):  # short prompts are noisy: best of three
            for r in stream_generate(model, tokenizer, prompt(n), max_tokens=1,
                                     sampler=greedy, prefill_step_size=step):  # fmt: skip
                best = max(best, r.prompt_tps)
        return best

    prefill_tps(16, args.prefill_step)  # warm-up: first calls pay for allocation
    lengths = [int(n) for n in args.lengths.split(",")]
    prefill = {n: prefill_tps(n, args.prefill_step) for n in lengths}
    *_, last = stream_generate(model, tokenizer, prompt(40), max_tokens=args.decode,
                               sampler=greedy, logits_processors=[no_eos])  # fmt: skip
    answers = []
    for question in QUESTIONS:
        messages = [{"role": "user", "content": question}]
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        answers.append("".join(r.text for r in stream_generate(
            model, tokenizer, text, max_tokens=args.answer_tokens, sampler=greedy)))  # fmt: skip
    steps = {}
    if name == "auto":
        steps = {int(s): prefill_tps(max(lengths), int(s)) for s in args.steps.split(",")}
    return {
        "setup": name,
        "blas": blas.name,
        "blas_path": blas.path,
        "dtype": dtype,
        "load_s": round(load_s, 2),
        "prefill_tps": {str(n): round(v, 1) for n, v in prefill.items()},
        "decode_tps": round(last.generation_tps, 1),
        "peak_memory_gb": round(mx.get_peak_memory() / 1e9, 2),
        "answers": answers,
        "step_tps": {str(s): round(v, 1) for s, v in steps.items()},
        "threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


def report(results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    naive = next((r for r in results if r["setup"] == "naive"), None)

    def cell(r: dict, value: float, pick) -> str:
        text = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
        if naive is None or r is naive or not pick(naive):
            return text
        return f"{text} ({value / pick(naive):.1f}x)"

    lengths = list(results[0]["prefill_tps"])
    table = Table(title="MLX CPU speed (tokens/s; ratio to naive)")
    for column in ["setup", "BLAS", "dtype", *[f"prefill {n}" for n in lengths], "decode"]:
        table.add_column(column, justify="left" if column in ("setup", "BLAS") else "right")
    table.add_column("answers = naive")
    for r in results:
        row = [r["setup"], r["blas"], r["dtype"]]
        row += [cell(r, r["prefill_tps"][n], lambda x, n=n: x["prefill_tps"][n]) for n in lengths]
        row.append(cell(r, r["decode_tps"], lambda x: x["decode_tps"]))
        if naive is None:
            row.append("-")
        else:
            same = sum(a == b for a, b in zip(r["answers"], naive["answers"], strict=True))
            row.append(f"{same}/{len(naive['answers'])}")
        table.add_row(*row)
    console = Console()
    if not console.is_terminal:
        console = Console(width=120)  # piped: Rich's 80 columns would wrap every cell
    console.print(table)
    for r in results:
        same = naive is not None and r is not naive and r["answers"] == naive["answers"]
        answers = "same as naive" if same else repr(r["answers"])
        console.print(f"{r['setup']}: load {r['load_s']} s, peak {r['peak_memory_gb']} GB, "
                      f"answers {answers}", highlight=False)  # fmt: skip
        if r["step_tps"]:
            best = max(r["step_tps"], key=r["step_tps"].get)
            console.print(f"prefill_step_size ({r['setup']}, {lengths[-1]} tokens): "
                          f"{r['step_tps']} -> best {best}", highlight=False)  # fmt: skip


if __name__ == "__main__":
    main()

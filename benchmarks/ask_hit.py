"""Whole-process wall time of `mlxc ask`: a cache hit vs a miss vs `python -c pass`.

    python benchmarks/ask_hit.py [--runs 7] [--model PATH] [--json]

Each figure is the median over --runs fresh processes (a hit must stay cheap to start:
no mlx, mlx_lm or transformers import). Uses a throwaway cache folder; the model folder is
mlxc's usual one, so the default model is converted once if needed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time


def wall(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--model", help="model for mlxc (default: mlxc's default)")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    env = dict(os.environ, MLXC_CACHE_DIR=tempfile.mkdtemp(prefix="mlxc-bench-"))
    if args.model:
        env["MLXC_MODEL"] = args.model
    mlxc = [sys.executable, "-m", "mlxc", "ask", "--max-tokens", str(args.max_tokens)]
    wall([*mlxc, "warm-up: convert the model if needed"], env)

    baseline = [wall([sys.executable, "-c", "pass"], env) for _ in range(args.runs)]
    misses, hits = [], []
    for i in range(args.runs):
        question = f"Name one fact about the number {i}."
        misses.append(wall([*mlxc, question], env))
        hits.append(wall([*mlxc, question], env))
    figures = {
        "python_pass_s": statistics.median(baseline),
        "hit_s": statistics.median(hits),
        "miss_s": statistics.median(misses),
        "runs": args.runs,
    }
    figures["miss_over_hit"] = figures["miss_s"] / figures["hit_s"]
    if args.json:
        print(json.dumps(figures))
        return
    print(f"python -c pass  {figures['python_pass_s']:.3f} s")
    print(f"mlxc ask hit    {figures['hit_s']:.3f} s   (target <= 0.15 s)")
    print(f"mlxc ask miss   {figures['miss_s']:.3f} s   ({args.max_tokens} tokens)")
    print(f"miss / hit      {figures['miss_over_hit']:.1f}x   (medians of {args.runs} runs)")


if __name__ == "__main__":
    main()

"""A long prefix's follow-up after a restart: time to first token with the prefix loaded from
the disk tier's blocks, against a cold prefill of the same prompt (prefix cache off), each in a
fresh process after a warm-up (the GPU compiles kernels on the first generation).

    python benchmarks/prefix_restart.py --model /tmp/m3b --tokens 8000
    python benchmarks/prefix_restart.py --model default --tokens 1000 --reps 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the quick brown fox jumps over a lazy dog while MLX arrays compute".split()


def prompt_text(tokenizer, tokens: int) -> str:
    words, i = [], 0
    while len(tokenizer.encode(" ".join(words))) < tokens:
        words.extend(f"{WORDS[(i * 7 + j) % len(WORDS)]}{i % 97}" for j in range(50))
        i += 1
    return " ".join(words)


def child(args) -> None:
    from mlxc.config import load_settings
    from mlxc.request import GenerationRequest
    from mlxc.service import Service

    settings = load_settings().with_overrides(
        cache_dir=Path(args.cache_dir), cache_policy="off", model=args.model, dtype=args.dtype)
    if args.role == "cold":
        settings = settings.with_overrides(prefix_memory_bytes=0, prefix_disk_bytes=0)
    svc = Service(settings)
    engine = svc.engine()
    engine.wait_loaded()
    text = prompt_text(engine.tokenizer, args.tokens)

    def ask(content: str, max_tokens: int = 1):
        t = time.perf_counter()
        reply = svc.start(GenerationRequest(
            messages=[{"role": "user", "content": content}], max_tokens=max_tokens))
        answer = reply.result()
        return time.perf_counter() - t, answer

    # Warm-up, not measured: the GPU compiles kernels on first use (~20 s on an H200), and
    # attention over a long cache with a few new tokens uses kernels a short prompt never
    # does. An unrelated ~1,500-token prompt, then a variant of it that reuses it (memory).
    other = prompt_text(engine.tokenizer, 1500).replace("fox", "cat")
    ask(other, 4)
    ask(other + " Why?", 4)
    out = {}
    if args.role == "write":
        _, answer = ask(text)
        engine.prompt_cache.flush()
        out["prompt_tokens"] = answer.usage.prompt_tokens
    else:
        seconds, answer = ask(text + " And one more question?")
        out.update(seconds=seconds, cached=answer.usage.cached_tokens,
                   prompt_tokens=answer.usage.prompt_tokens, text=answer.text)
    print(json.dumps(out), flush=True)
    svc.close()


def run(args, role: str, cache: Path) -> dict:
    command = [sys.executable, __file__, "--child", role, "--cache-dir", str(cache),
               "--tokens", str(args.tokens)]
    for flag in ("model", "dtype"):
        if getattr(args, flag):
            command += [f"--{flag}", getattr(args, flag)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--dtype")
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--child", dest="role", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role:
        return child(args)
    cold, warm = [], []
    with tempfile.TemporaryDirectory(prefix="mlxc-restart-") as tmp:
        for i in range(args.reps):
            cold.append(run(args, "cold", Path(tmp) / f"cold{i}"))
            written = run(args, "write", Path(tmp) / f"c{i}")
            warm.append(run(args, "read", Path(tmp) / f"c{i}"))
    c = statistics.median(r["seconds"] for r in cold)
    w = statistics.median(r["seconds"] for r in warm)
    print(json.dumps({
        "prompt_tokens": written["prompt_tokens"], "cold_s": round(c, 3),
        "restart_s": round(w, 3), "ratio": round(w / c, 3),
        "reused": [r["cached"] for r in warm],
        "same_answer": [a["text"] == b["text"] for a, b in zip(cold, warm, strict=True)],
        "cold_all": [round(r["seconds"], 3) for r in cold],
        "restart_all": [round(r["seconds"], 3) for r in warm],
    }))


if __name__ == "__main__":
    main()

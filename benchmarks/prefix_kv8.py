"""8-bit KV on disk (`MLXC_PREFIX_DISK_BITS=8`): does reuse keep greedy answers, and how many
bytes does it save? For each model, prompts of a few hundred tokens (chunks of this repository's
README and sources, each with a question) are answered:

- cold: prefix cache off (the reference);
- for disk bits 0 (control) and 8: once to store the blocks (one answer token), then again by
  a fresh engine on the same folder (a restart: the memory tier starts empty, so the reused
  tokens come from disk, except a few of a shared chat header loaded once and kept).

Printed as JSON per model: bytes per full block on disk at 0 and 8 bits and the share saved,
prompts compared, tokens reused from disk, how many answers differ from cold and at which
answer token each first differs.

    python benchmarks/prefix_kv8.py --prompts 50             # the tiny model: seconds
    python benchmarks/prefix_kv8.py --models tiny,default --prompts 30   # + SmolLM2 if present
    python benchmarks/prefix_kv8.py --models default --dtype bfloat16 --prompts 20
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
QUESTIONS = ["In one sentence, what is this text about?", "List two things this text mentions.",
             "What would you ask the author of this text?", "Summarise this in five words."]


def documents(n: int, rng: random.Random, tokenizer, tokens: tuple[int, int]) -> list[str]:
    """`n` chunks of real text and code, `tokens` (low, high) tokens long each."""
    files = [ROOT / "README.md", *sorted((ROOT / "mlxc").rglob("*.py"))]
    text = "\n".join(p.read_text(errors="replace") for p in files)
    out = []
    for _ in range(n):
        start = rng.randrange(0, len(text) - 20_000)
        ids = tokenizer.encode(text[start : start + 8 * tokens[1]], add_special_tokens=False)
        out.append(tokenizer.decode(ids[: rng.randrange(*tokens)]))
    return out


def open_service(model: str, models_dir: Path, cache: Path, args, bits: int,
                 off: bool = False):
    from mlxc.config import Settings
    from mlxc.service import Service

    budgets = {"prefix_memory_bytes": 0, "prefix_disk_bytes": 0} if off else {
        "prefix_memory_bytes": 4 << 30, "prefix_disk_bytes": 16 << 30}
    return Service(Settings(model=model, cache_dir=cache, models_dir=models_dir,
                            cache_policy="off", prefix_block_tokens=args.block,
                            dtype=args.dtype, prefix_disk_bits=bits, **budgets).validated())


def answer_all(svc, prompts: list[list[dict]], max_tokens: int) -> list[dict]:
    from mlxc.request import GenerationRequest

    out = []
    for messages in prompts:
        request = GenerationRequest(messages=messages, max_tokens=max_tokens, temperature=0.0,
                                    logprobs=True, top_logprobs=2)
        answer = svc.start(request).result()
        out.append({"ids": [t["id"] for t in answer.logprobs], "cached": answer.usage.cached_tokens,
                    "prompt_tokens": answer.usage.prompt_tokens,
                    # top-1 minus top-2 log-probability per token: how near a tie each pick was
                    "margins": [t["top_logprobs"][0]["logprob"] - t["top_logprobs"][1]["logprob"]
                                for t in answer.logprobs]})
    return out


def first_difference(cold: dict, other: dict) -> dict | None:
    """Where `other`'s answer first leaves the cold one: the answer token's index and the cold
    pick's margin over the runner-up there (None if they are the same)."""
    x, y = cold["ids"], other["ids"]
    if x == y:
        return None
    n = 0
    while n < min(len(x), len(y)) and x[n] == y[n]:
        n += 1
    margin = cold["margins"][n] if n < len(cold["margins"]) else None
    return {"token": n, "cold_margin": round(margin, 4) if margin is not None else None}


def block_files(cache: Path, block: int) -> tuple[list[int], int, int]:
    """(sizes of the whole blocks' files, bytes of every block file, tokens they hold)."""
    from mlxc.engine.kv.block_file import read_header

    whole, total, tokens = [], 0, 0
    for path in (cache / "prefix" / "blocks").glob("*.kvb"):
        size, n = path.stat().st_size, len(read_header(path).tokens)
        total, tokens = total + size, tokens + n
        if n == block:
            whole.append(size)
    return whole, total, tokens


def measure(name: str, model: str, models_dir: Path, scratch: Path, args) -> dict:
    started = time.perf_counter()
    svc = open_service(model, models_dir, scratch / f"{name}-cold", args, 0, off=True)
    svc.engine().wait_loaded()
    docs = documents(args.prompts, random.Random(0), svc.engine().tokenizer,
                     (args.min_tokens, args.tokens))
    prompts = [[{"role": "user", "content": f"{doc}\n\n{QUESTIONS[i % len(QUESTIONS)]}"}]
               for i, doc in enumerate(docs)]
    cold = answer_all(svc, prompts, args.max_tokens)
    svc.close()
    result = {"model": name, "dtype": args.dtype, "prompts": len(prompts),
              "block_tokens": args.block,
              "max_tokens": args.max_tokens,
              "prompt_tokens_mean": round(statistics.mean(c["prompt_tokens"] for c in cold))}
    for bits in (0, 8):
        cache = scratch / f"{name}-{bits}"
        svc = open_service(model, models_dir, cache, args, bits)
        answer_all(svc, prompts, 1)  # stores each prompt's blocks (one token: no time spent)
        svc.close()  # waits for the writer
        svc = open_service(model, models_dir, cache, args, bits)  # a restart
        again = answer_all(svc, prompts, args.max_tokens)
        stats = svc.prefix_stats()
        svc.close()
        firsts = [first_difference(c, a) for c, a in zip(cold, again, strict=True)]
        whole, total, tokens = block_files(cache, args.block)
        result[f"bits_{bits}"] = {
            "bytes_per_block": round(statistics.mean(whole)) if whole else None,
            "whole_blocks": len(whole),
            "disk_bytes": total,
            "bytes_per_token": round(total / tokens),
            "disk_tokens_reused": stats["disk_tokens_reused"],
            "memory_tokens_reused": stats["memory_tokens_reused"],
            "reused_share": round(sum(a["cached"] for a in again)
                                  / sum(a["prompt_tokens"] for a in again), 3),
            "answers_differ": sum(f is not None for f in firsts),
            "first_differences": [f for f in firsts if f is not None],
        }
    full, kv8 = result["bits_0"], result["bits_8"]
    if full["bytes_per_block"] and kv8["bytes_per_block"]:
        result["block_bytes_saved"] = round(1 - kv8["bytes_per_block"] / full["bytes_per_block"],
                                            3)
    result["disk_bytes_saved"] = round(1 - kv8["disk_bytes"] / full["disk_bytes"], 3)
    result["identical"] = full["answers_differ"] == kv8["answers_differ"] == 0
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="tiny",
                        help="comma-separated: tiny (a tiny random llama made here), default "
                             "(mlxc's default model, skipped if not downloaded) or a folder")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--min-tokens", type=int, default=200, help="document tokens, least")
    parser.add_argument("--tokens", type=int, default=600, help="document tokens, most")
    parser.add_argument("--max-tokens", type=int, default=32, help="answer tokens")
    parser.add_argument("--block", type=int, default=256, help="block size in tokens")
    parser.add_argument("--dtype", default="auto", help="the model's compute (and KV) dtype")
    args = parser.parse_args()
    from mlxc.config import DEFAULT_MODEL, Settings
    from mlxc.model.blas import load_optimised_blas
    from mlxc.model.refs import DEFAULT_MODEL_FOLDER

    load_optimised_blas()
    results = []
    with tempfile.TemporaryDirectory(prefix="mlxc-kv8-") as tmp:
        scratch = Path(tmp)
        for name in args.models.split(","):
            models_dir = scratch / "models"
            if name == "tiny":
                from tiny_model import make_tiny_model, rescaled_copy

                model = str(rescaled_copy(make_tiny_model(scratch / "t0"), scratch / "tiny", 4.0))
            elif name == "default":
                models_dir = Settings().models_dir
                if not (models_dir / DEFAULT_MODEL_FOLDER).is_dir():
                    results.append({"model": name, "skipped": "not downloaded"})
                    continue
                model = DEFAULT_MODEL
            else:
                model = name
            results.append(measure(name, model, models_dir, scratch, args))
            print(json.dumps(results[-1]), file=sys.stderr, flush=True)  # progress
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()

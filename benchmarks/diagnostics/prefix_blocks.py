"""The prefix cache's blocks against issue 12's targets, measured through the engine's own
PrefixCache (fetch, prefill, store, as a request does) on token lists:

- write: bytes written per turn / (new tokens x KV bytes per token), over a conversation with a
  1,000-token system prompt (target <= 1.5)
- share: disk growth from a second conversation with the same system prompt / one state (<= 0.35)
- lookup: time to fetch a 4-block prefix from disk after a restart, with 10,000 blocks on disk
  / with 10 (<= 1.5); blocks beyond the first conversation's are written directly (random KV)
- memory: memory tier bytes (and MLX active memory) for 200 distinct short prompts / their KV
  bytes (<= 10)

    python benchmarks/diagnostics/prefix_blocks.py                  # a tiny random model (seconds)
    python benchmarks/diagnostics/prefix_blocks.py --model default  # mlxc's default model
    python benchmarks/diagnostics/prefix_blocks.py --block 128 --json
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))


def open_service(model: str, cache: Path, block: int, memory: int = 8 << 30):
    from mlxc.config import Settings
    from mlxc.service import Service

    return Service(Settings(model=model, cache_dir=cache, models_dir=cache / "models",
                            cache_policy="off", prefix_block_tokens=block,
                            prefix_disk_bytes=64 << 30, prefix_memory_bytes=memory))


def on_engine(svc, fn):
    return svc.engine().call(fn).result()


def turn(engine, tokens: list[int]) -> None:
    cache = engine.prompt_cache
    state, todo = cache.fetch(tokens)
    cache._prefill(state, todo)
    cache.store(tokens, state)
    cache.flush()


def kv_per_token(engine) -> float:
    from mlx_lm.models.cache import make_prompt_cache

    from mlxc.engine.kv.block_kv import leaves

    state = make_prompt_cache(engine.model)
    engine.prompt_cache._prefill(state, list(range(3, 67)))
    return sum(x[..., :64, :].nbytes for layer in state for x in leaves(layer)) / 64


def measure_writes(svc, rng) -> dict:
    vocab = 300
    system = [rng.randrange(3, vocab) for _ in range(1000)]

    def run(engine):
        per_token = kv_per_token(engine)
        first_turn = [rng.randrange(3, vocab) for _ in range(180)]
        tokens, ratios = system + first_turn, []
        turn(engine, tokens)
        for _ in range(6):  # a question (~30 tokens) and an answer (~150)
            new = [rng.randrange(3, vocab) for _ in range(rng.randrange(20, 40) +
                                                        rng.randrange(60, 250))]
            before = engine.prompt_cache.stats()["bytes_written"]
            tokens += new
            turn(engine, tokens)
            written = engine.prompt_cache.stats()["bytes_written"] - before
            ratios.append(written / (len(new) * per_token))
        # Conversations two and three: the same system prompt, their own question and answer.
        grown = []
        for _ in range(2):
            before = engine.prompt_cache.stats()["bytes_written"]
            other = system + [rng.randrange(3, vocab) for _ in range(180)]
            turn(engine, other)
            # Bytes written: at least what the disk grew by.
            grown.append(engine.prompt_cache.stats()["bytes_written"] - before)
        return {
            "kv_bytes_per_token": per_token,
            "write_ratio_per_turn": [round(r, 3) for r in ratios],
            "write_ratio_max": round(max(ratios), 3),
            "share_growth_of_a_state": [round(g / (len(other) * per_token), 3) for g in grown],
        }

    return on_engine(svc, run)


def fill_blocks(svc, n: int, rng) -> None:
    """n more blocks on disk of random KV under random token chains (no prefill)."""
    def run(engine):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        tiers = engine.prompt_cache.tiers
        size = tiers.block_size
        template = make_prompt_cache(engine.model)
        engine.prompt_cache._prefill(template, [5] * size)
        done = 0
        while done < n:
            chain = min(8, n - done)
            tokens = [rng.randrange(3, 300) for _ in range(chain * size)]
            state = make_prompt_cache(engine.model)
            for layer, t in zip(state, template, strict=True):
                layer.keys = mx.concatenate([t.keys[..., :size, :]] * chain, axis=2)
                layer.values = mx.concatenate([t.values[..., :size, :]] * chain, axis=2)
                layer.offset = chain * size
            tiers.keep(tokens, state)
            tiers.flush()
            done += chain

    on_engine(svc, run)


def measure_lookup(model: str, block: int, scratch: Path, rng, reps: int) -> dict:
    """Fetch time of a 4-block prompt from disk in a fresh engine: 10 vs 10,000 blocks."""
    prompt = [rng.randrange(3, 300) for _ in range(4 * block + 5)]
    out = {}
    for total in (10, 10_000):
        cache = scratch / f"lookup-{total}"
        svc = open_service(model, cache, block, memory=64 << 20)  # blocks matter on disk
        on_engine(svc, lambda e: turn(e, prompt))
        mine = sorted((cache / "prefix" / "blocks").glob("*.kvb"))
        fill_blocks(svc, total - 5, rng)
        svc.close()
        times, starts, walks = [], [], []
        for _ in range(reps):
            t0 = time.perf_counter()
            svc = open_service(model, cache, block)
            svc.engine().wait_loaded()  # the model, and the index read into the block tree
            starts.append(time.perf_counter() - t0)

            def fetch(engine, mine=mine):
                for path in mine:  # the same page-cache state in both cases (a busy machine
                    path.read_bytes()  # evicts files): the index and the loading are timed
                engine.prompt_cache.fetch(prompt)  # untimed: a fresh process's first MLX work
                tree = engine.prompt_cache.tiers.tree
                tree.memory_limit, limit = 0, tree.memory_limit
                tree._evict()  # the memory tier emptied: the blocks come from disk
                tree.memory_limit = limit
                t = time.perf_counter()
                engine.prompt_cache.tiers.tree.walk(prompt)
                walked = time.perf_counter() - t
                t = time.perf_counter()
                state, todo = engine.prompt_cache.fetch(prompt)
                return time.perf_counter() - t, walked, len(prompt) - len(todo)

            took, walked, reused = on_engine(svc, fetch)
            assert reused == len(prompt) - 1, reused
            times.append(took)
            walks.append(walked)
            svc.close()
        out[total] = {"fetch_s": round(statistics.median(times), 5),
                      "walk_s": round(statistics.median(walks), 6),
                      "engine_start_s": round(statistics.median(starts), 3)}
    out["ratio"] = round(out[10_000]["fetch_s"] / out[10]["fetch_s"], 3)
    return out


def measure_memory(svc, rng) -> dict:
    def run(engine):
        import mlx.core as mx

        per_token = kv_per_token(engine)
        mx.clear_cache()
        base = mx.get_active_memory()
        tokens = 0
        for i in range(200):
            size = rng.randrange(30, 60)
            prompt = [7, i % 250 + 3, *(rng.randrange(3, 300) for _ in range(size))]
            turn(engine, prompt)
            tokens += len(prompt)
        mx.clear_cache()
        stats = engine.prompt_cache.stats()
        kv = tokens * per_token
        return {
            "prompts": 200, "kv_bytes": int(kv),
            "memory_tier_ratio": round(stats["memory_bytes"] / kv, 3),
            "mlx_active_ratio": round((mx.get_active_memory() - base) / kv, 3),
        }

    return on_engine(svc, run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a model (default: a tiny random llama made here)")
    parser.add_argument("--block", type=int, default=256, help="block size in tokens")
    parser.add_argument("--reps", type=int, default=5, help="lookups timed per case")
    parser.add_argument("--skip-lookup", action="store_true", help="no 10,000-block case")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from mlxc.model.blas import load_optimised_blas

    load_optimised_blas()
    rng = random.Random(0)
    with tempfile.TemporaryDirectory(prefix="mlxc-blocks-") as tmp:
        scratch = Path(tmp)
        model = args.model
        if model is None:
            from tiny_model import make_tiny_model, rescaled_copy

            model = str(rescaled_copy(make_tiny_model(scratch / "t0"), scratch / "tiny", 4.0))
        svc = open_service(model, scratch / "w", args.block)
        result = {"block": args.block, "model": args.model or "tiny", **measure_writes(svc, rng)}
        svc.close()
        svc = open_service(model, scratch / "m", args.block)
        result["memory"] = measure_memory(svc, rng)
        svc.close()
        if not args.skip_lookup:
            result["lookup"] = measure_lookup(model, args.block, scratch, rng, args.reps)
    if args.json:
        print(json.dumps(result))
        return
    for key, value in result.items():
        print(f"{key:28} {value}")


if __name__ == "__main__":
    main()

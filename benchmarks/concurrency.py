"""Continuous batching, measured in-process on mlxc's engine (CPU or GPU), greedy, no caches.

    python benchmarks/concurrency.py [--model PATH] [--tokens 64] [--levels 1,2,4,8]
                                     [--fidelity 50] [--max-batch 8] [--json]

Reports, each measured in this one run:
- warm-up: seconds `Engine.warm_up` takes (kernel compilation on CUDA), then the first
  request's TTFT and end-to-end time (target: <= 1 s after `mlxc serve` reports ready);
- lone decode: mlxc tokens/s ÷ raw `mlx_lm.stream_generate` (alternating rounds; >= 0.97);
- 4 concurrent ÷ sequential sum: wall of 4 different requests sent at once over the sum of
  the same 4 sent one after another (<= 0.5 CPU, <= 0.35 H200); median of --rounds;
- aggregate tokens/s at each level of clients at once (median of --rounds), and its ratio to
  one stream's (8: >= 4x);
- prefill interference: a running stream's decode speed while another request prefills
  ~2,000 tokens, as a share of its solo speed (aim >= 50%);
- fidelity: how many of N greedy answers made in batches differ from the same request alone,
  and how many of the first 10 lone answers equal `mlx_lm.stream_generate`'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

from shared import (
    decode_tps,
    gaps,
    mlx_lm_text,
    prompt,
    raw_decode_tps,
    timed,
    together,
)

from mlxc.config import load_settings
from mlxc.engine.worker import Engine
from mlxc.model.refs import resolve_model
from mlxc.stream import Delta


def interference(engine: Engine, tokens: int, long_words: int) -> dict:
    """A stream's decode speed solo, and while another request prefills a long prompt."""
    stream = prompt(0).model_copy(update={"max_tokens": tokens * 4})
    solo = timed(engine, stream)
    solo_gap = statistics.median(gaps(solo["times"]))
    long = prompt(1, long_words).model_copy(update={"max_tokens": 1})
    n_long = len(engine.encode(long))
    # Long enough to outlive the prefill (a 2,937-token one takes ~50 s beside it on a 2-core
    # CPU: a stream of `tokens * 4` ended inside that window and read as slowed down).
    generation = engine.submit(stream.model_copy(update={"max_tokens": 2048}))
    times: list[float] = []
    window: dict[str, float] = {}
    done = threading.Event()

    def follow() -> None:
        for event in generation.events():
            if isinstance(event, Delta):
                times.append(time.perf_counter())
            if done.is_set():
                break  # leaving cancels the stream

    follower = threading.Thread(target=follow)
    follower.start()
    while len(times) < 8:
        time.sleep(0.001)
    window["start"] = time.perf_counter()
    long_figures = timed(engine, long)
    window["end"] = time.perf_counter()
    done.set()
    follower.join()
    during = [t for t in times if window["start"] <= t <= window["end"]]
    span = window["end"] - window["start"]
    kept = (len(during) / span) * solo_gap if span > 0 else 0.0
    return {"prefill_tokens": n_long, "prefill_seconds": round(long_figures["ttft"], 3),
            "solo_tokens_per_second": round(1 / solo_gap, 1),
            "during_prefill_tokens_per_second": round(len(during) / span, 1),
            "kept_share": round(kept, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: mlxc's default)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--levels", default="1,2,4,8")
    parser.add_argument("--fidelity", type=int, default=50, help="prompts for the check")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--long-words", type=int, default=1000, help="~2 tokens each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    levels = [int(x) for x in args.levels.split(",")]
    settings = load_settings().with_overrides(
        cache_dir=Path(tempfile.mkdtemp(prefix="mlxc-concurrency-")), model=args.model,
        prefix_memory_bytes=0, prefix_disk_bytes=0,  # no reuse: every prompt is prefilled
    )
    out: dict = {}
    started = time.perf_counter()
    engine = Engine(resolve_model(settings.model, settings), settings,
                    max_batch=args.max_batch, max_queue=1024).start()
    engine.wait_loaded()
    out["load_seconds"] = round(time.perf_counter() - started, 2)
    started = time.perf_counter()
    engine.call(lambda e: e.warm_up()).result()
    out["warm_up_seconds"] = round(time.perf_counter() - started, 2)
    first = timed(engine, prompt(99).model_copy(update={"max_tokens": 16}))
    out["first_request"] = {"ttft": round(first["ttft"], 3), "e2e": round(first["e2e"], 3),
                            "tokens": first["tokens"]}
    out["dtype"], out["model"] = engine.dtype, str(engine.ref.folder)
    import mlx.core as mx

    out["device"] = str(mx.default_device())

    lone = prompt(0).model_copy(update={"max_tokens": args.tokens})
    ours, raw = [], []
    for _ in range(args.rounds):
        raw.append(engine.call(lambda e: raw_decode_tps(e, lone, args.tokens)).result())
        ours.append(decode_tps(timed(engine, lone)))
    out["lone_decode"] = {"mlxc": round(statistics.median(ours), 1),
                          "mlx_lm": round(statistics.median(raw), 1),
                          "ratio": round(statistics.median(ours) / statistics.median(raw), 3)}

    # The H200's speed drifts by up to a third between seconds: each figure below is the
    # median of --rounds, sequential and together side by side in each round.
    four = [prompt(i).model_copy(update={"max_tokens": args.tokens}) for i in range(4)]
    walls, sums = [], []
    for _ in range(args.rounds):
        sums.append(sum(timed(engine, r)["e2e"] for r in four))
        walls.append(together(engine, four)[0])
    out["four_concurrent"] = {
        "wall": round(statistics.median(walls), 3),
        "sequential_sum": round(statistics.median(sums), 3),
        "ratio": round(statistics.median(w / s for w, s in zip(walls, sums, strict=True)), 3),
        "ratios": [round(w / s, 3) for w, s in zip(walls, sums, strict=True)]}

    out["levels"] = {}
    for level in levels:
        requests = [prompt(10 + i).model_copy(update={"max_tokens": args.tokens})
                    for i in range(level)]
        runs = [together(engine, requests) for _ in range(args.rounds)]
        rates = [sum(f["tokens"] for f in figures) / wall for wall, figures in runs]
        pooled = [f for _, figures in runs for f in figures]
        ttfts = sorted(f["ttft"] for f in pooled)
        itl = sorted(g for f in pooled for g in gaps(f["times"]))
        out["levels"][level] = {
            "aggregate_tokens_per_second": round(statistics.median(rates), 1),
            "rates": [round(r, 1) for r in rates],
            "tokens": [f["tokens"] for f in runs[0][1]],
            "wall": round(statistics.median(wall for wall, _ in runs), 3),
            "ttft_p50_ms": round(1000 * statistics.median(ttfts), 1),
            "ttft_max_ms": round(1000 * ttfts[-1], 1),
            "itl_p50_ms": round(1000 * statistics.median(itl), 2) if itl else None,
            "itl_p99_ms": round(1000 * itl[int(0.99 * (len(itl) - 1))], 2) if itl else None,
        }
    one = out["levels"].get(1, {}).get("aggregate_tokens_per_second")
    if one:
        for figures in out["levels"].values():
            figures["vs_one_stream"] = round(figures["aggregate_tokens_per_second"] / one, 2)

    out["prefill_interference"] = interference(engine, args.tokens, args.long_words)

    if args.fidelity:
        requests = [prompt(100 + i).model_copy(update={"max_tokens": args.tokens})
                    for i in range(args.fidelity)]
        alone = [engine.submit(r).result().text for r in requests]
        theirs = [engine.call(lambda e, r=r: mlx_lm_text(e, r)).result() for r in requests[:10]]
        same = sum(a == b for a, b in zip(alone, theirs, strict=False))
        out["lone_equals_mlx_lm"] = f"{same}/{len(theirs)}"
        generations = [engine.submit(r) for r in requests]
        batched = [g.result().text for g in generations]
        differ = [i for i, (a, b) in enumerate(zip(alone, batched, strict=True)) if a != b]
        out["fidelity"] = {"prompts": len(requests), "differ": len(differ),
                           "max_batch": args.max_batch}
    out["batch_sizes"] = engine.figures()["batch_sizes"]
    engine.shutdown(wait=30)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

"""Latency of `mlxc serve`, measured in one run against a real server process:

  * /health while a long generation runs (p50, max): the event loop never waits on MLX;
  * cache hits (p50, p99): answered from the disk store without touching the engine;
  * misses (each one a full generation).

    python benchmarks/server_latency.py                      # the default model
    python benchmarks/server_latency.py --model ./mlx-folder --json

The server gets a fresh temporary cache folder (so misses are misses); models are shared
with your normal mlxc folder, so the default model is fetched and converted only once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import percentile, start_server  # noqa: E402


def ask(client: httpx.Client, question: str, max_tokens: int, **headers) -> tuple[float, str]:
    body = {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens}
    started = time.perf_counter()
    response = client.post("/v1/chat/completions", json=body, headers=headers)
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed, response.headers["x-mlxc-cache"]


def measure(args, url: str) -> dict:
    client = httpx.Client(base_url=url, timeout=600)
    questions = [f"In one sentence, what is {topic}?" for topic in
                 ("MLX", "a GPU", "Paris", "a cache", "entropy", "a compiler", "rust",
                  "a lighthouse", "jazz", "photosynthesis")][: args.misses]
    misses = []
    for question in questions:
        seconds, status = ask(client, question, args.max_tokens)
        assert status == "miss", status
        misses.append(seconds)
    hits = []
    for i in range(args.hits):
        seconds, status = ask(client, questions[i % len(questions)], args.max_tokens)
        assert status == "hit", status
        hits.append(seconds)

    # /health idle first, as the baseline for the same while the engine works.
    idle = []
    for _ in range(args.idle_samples):
        started = time.perf_counter()
        client.get("/health").raise_for_status()
        idle.append(time.perf_counter() - started)
        time.sleep(args.health_interval)

    # /health, polled while one long generation (never stored) holds the engine.
    long_done = threading.Event()

    def long_generation() -> None:
        with httpx.Client(base_url=url, timeout=600) as other:
            ask(other, "Write a long story about a lighthouse keeper.", args.long_tokens,
                **{"Cache-Control": "no-store"})
        long_done.set()

    thread = threading.Thread(target=long_generation)
    thread.start()
    while client.get("/health").json()["queue_depth"] < 1 and not long_done.is_set():
        time.sleep(0.005)
    health, busy = [], 0
    while not long_done.is_set():
        started = time.perf_counter()
        body = client.get("/health").json()
        health.append(time.perf_counter() - started)
        busy += body["queue_depth"] >= 1
        time.sleep(args.health_interval)
    thread.join()
    final = client.get("/health").json()
    ms = 1000
    return {
        "model": final["model"],
        "health_ms": {"p50": statistics.median(health) * ms, "max": max(health) * ms,
                      "samples": len(health), "while_busy": busy},
        "idle_health_ms": {"p50": statistics.median(idle) * ms, "max": max(idle) * ms,
                           "samples": len(idle)},
        "hit_ms": {"p50": statistics.median(hits) * ms, "p99": percentile(hits, 99) * ms,
                   "samples": len(hits)},
        "miss_ms": {"p50": statistics.median(misses) * ms, "max": max(misses) * ms,
                    "samples": len(misses), "max_tokens": args.max_tokens},
        "long_generation_tokens": args.long_tokens,
        "decode_tokens_per_second": final["tokens_per_second"],
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mlxc serve latency — {result['model']}", title_justify="left")
    for column in ("what", "p50 ms", "tail ms", "samples"):
        table.add_column(column, justify="left" if column == "what" else "right")
    h, hit, miss = result["health_ms"], result["hit_ms"], result["miss_ms"]
    idle = result["idle_health_ms"]
    table.add_row("/health, engine idle (baseline)", f"{idle['p50']:.2f}",
                  f"{idle['max']:.2f} (max)", str(idle["samples"]))
    table.add_row(f"/health during a {result['long_generation_tokens']}-token generation",
                  f"{h['p50']:.2f}", f"{h['max']:.2f} (max)", str(h["samples"]))
    table.add_row("cache hit (chat completion)", f"{hit['p50']:.2f}",
                  f"{hit['p99']:.2f} (p99)", str(hit["samples"]))
    table.add_row(f"miss ({miss['max_tokens']} tokens)", f"{miss['p50']:.0f}",
                  f"{miss['max']:.0f} (max)", str(miss["samples"]))
    Console().print(table)
    print(f"decode speed: {result['decode_tokens_per_second']} tokens/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="as `mlxc serve --model` (default: the default model)")
    parser.add_argument("--hits", type=int, default=200)
    parser.add_argument("--misses", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=16, help="per hit/miss request")
    parser.add_argument("--long-tokens", type=int, default=128, help="the long generation")
    parser.add_argument("--health-interval", type=float, default=0.02)
    parser.add_argument("--idle-samples", type=int, default=100)
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="mlxc-bench-") as tmp:
        proc, url = start_server(args.model, Path(tmp) / "cache", Path(tmp) / "server.log",
                                 args.startup_timeout)
        try:
            result = measure(args, url)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()

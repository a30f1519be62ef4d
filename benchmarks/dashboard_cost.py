"""What an open dashboard costs a serving `mlxc serve` (issue 27: ≤ 1% of decode throughput):
the server process's CPU seconds per dashboard poll (GET /health and /v1/cache/misses, what
the page asks each second), read from /proc around a few hundred polls on an idle server, as a
fraction of the CPU a decoding miss uses per second; and decode tokens/s of misses with the
page's polling on against off, taken in turns (noisy on a shared machine: the CPU figure is the
one that resolves 1%).

    python benchmarks/dashboard_cost.py [--polls 300] [--misses 3] [--max-tokens 48]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import start_server  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of the process and its threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def poll_once(client: httpx.Client) -> None:
    client.get("/health").raise_for_status()
    client.get("/v1/cache/misses", params={"since": 0}).raise_for_status()


def miss(client: httpx.Client, i: int, max_tokens: int) -> int:
    """A generation of a prompt not asked before: its completion tokens."""
    body = {"messages": [{"role": "user", "content": f"Tell story number {i} about a cat."}],
            "max_tokens": max_tokens, "temperature": 0}
    r = client.post("/v1/chat/completions", json=body)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--polls", type=int, default=300)
    parser.add_argument("--misses", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    proc, url = start_server(None, folder / "cache", folder / "serve.log", 300)
    report: dict = {}
    try:
        with httpx.Client(base_url=url, timeout=120) as client:
            poll_once(client)
            before, started = cpu_seconds(proc.pid), time.perf_counter()
            for _ in range(args.polls):
                poll_once(client)
            per_poll = (cpu_seconds(proc.pid) - before) / args.polls
            report["cpu_ms_per_poll"] = per_poll * 1e3
            report["poll_wall_ms"] = (time.perf_counter() - started) / args.polls * 1e3
            miss(client, -1, 8)  # warm-up
            before, started = cpu_seconds(proc.pid), time.perf_counter()
            miss(client, 0, args.max_tokens)
            decode_cpu = (cpu_seconds(proc.pid) - before) / (time.perf_counter() - started)
            report["decode_cpu_per_s"] = decode_cpu
            report["page_share_of_decode_cpu"] = per_poll / decode_cpu  # one poll a second
            speeds: dict[str, list[float]] = {"off": [], "on": []}
            for i in range(1, args.misses + 1):
                for mode in ("off", "on") if i % 2 else ("on", "off"):
                    stop = threading.Event()

                    def page(stop=stop):
                        with httpx.Client(base_url=url, timeout=30) as c:
                            while not stop.wait(1.0):
                                poll_once(c)

                    poller = threading.Thread(target=page, daemon=True)
                    if mode == "on":
                        poller.start()
                    t0 = time.perf_counter()
                    tokens = miss(client, i * 10 + (mode == "on"), args.max_tokens)
                    speeds[mode].append(tokens / (time.perf_counter() - t0))
                    stop.set()
                    if mode == "on":
                        poller.join()
            report["tok_s"] = {m: statistics.median(v) for m, v in speeds.items()}
            report["tok_s_ratio_on_off"] = report["tok_s"]["on"] / report["tok_s"]["off"]
    finally:
        proc.terminate()
        proc.wait(30)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

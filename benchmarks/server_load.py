"""Many keep-alive clients against a real `mlxc serve`, hits and misses mixed: p50/p99 of
cache hits and of /health while misses decode in the engine's batch.

    python benchmarks/server_load.py                      # 32 clients, 20 s, the default model
    python benchmarks/server_load.py --clients 8 --miss-clients 2 --seconds 10 --json

Of --clients keep-alive connections, --miss-clients loop on questions never asked (each a
generation of --miss-tokens) and the rest loop on cache hits (one of --warm questions
answered before the load starts); one more connection polls /health as fast as it is
answered. Hits and /health are driven by `wrk` (a C load generator: `apt-get install wrk`,
`brew install wrk`), so the figures are the server's, not a Python client's own time (an
httpx client costs ~1-2 ms of CPU a request, which on a small machine is most of a hit);
misses by Python threads. The server gets a fresh cache folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import percentile, start_server  # noqa: E402

# wrk's Lua: rotate over the given bodies (none: GET), count replies that are not hits, and
# print the latency figures as one JSON line when done.
WRK_SCRIPT = """
local bodies = {%(bodies)s}
local i, not_hit = 0, 0
request = function()
  if #bodies == 0 then return wrk.format("GET", "%(path)s") end
  i = i + 1
  return wrk.format("POST", "%(path)s", {["Content-Type"] = "application/json"},
                    bodies[(i %% #bodies) + 1])
end
response = function(status, headers, body)
  if status ~= 200 or (#bodies > 0 and headers["x-mlxc-cache"] ~= "hit") then
    not_hit = not_hit + 1
  end
end
done = function(summary, latency, requests)
  io.write(string.format(
    '\\nRESULT {"p50": %%.3f, "p90": %%.3f, "p99": %%.3f, "p999": %%.3f, "max": %%.3f, '
    .. '"samples": %%d, "not_ok": %%d}\\n',
    latency:percentile(50) / 1000, latency:percentile(90) / 1000,
    latency:percentile(99) / 1000, latency:percentile(99.9) / 1000, latency.max / 1000,
    summary.requests, not_hit))
end
"""


def chat_body(question: str, max_tokens: int) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens,
            "temperature": 0.0}


def wrk(url: str, path: str, bodies: list[str], connections: int, seconds: float,
        folder: Path) -> subprocess.Popen:
    script = folder / f"load{connections}{path.replace('/', '_')}.lua"
    lua_bodies = ", ".join(f"[==[{body}]==]" for body in bodies)
    script.write_text(WRK_SCRIPT % {"bodies": lua_bodies, "path": path})
    # One wrk thread: the machine's cores are for the server.
    return subprocess.Popen(
        ["wrk", "-t1", f"-c{connections}", f"-d{round(seconds)}s", "--timeout", "60s", "-s",
         str(script), url], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def result_of(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate()
    for line in out.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise SystemExit(f"wrk gave no result:\n{out}")


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds of each of the server's threads by name (Linux /proc; else empty): the
    event loop's share per request is what limits hits, and it reads the same on a busy
    machine, where latencies do not."""
    ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    seconds: dict[str, float] = {}
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue  # a thread that ended
        name = "loop" if stat.parent.name == str(pid) else text[text.index("(") + 1:
                                                                  text.rindex(")")]
        fields = text[text.rindex(")") + 2:].split()
        seconds[name] = seconds.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def load(args, url: str, folder: Path, pid: int) -> dict:
    warm = [f"In one sentence, what is topic number {i}?" for i in range(args.warm)]
    with httpx.Client(base_url=url, timeout=600) as client:
        for question in warm:  # the hits' answers, stored before the load starts
            client.post("/v1/chat/completions", json=chat_body(question, 8)).raise_for_status()
    misses: list[float] = []
    stop = threading.Event()

    def miss_loop(k: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as client:
            for n in range(10**9):
                if stop.is_set():
                    return
                body = chat_body(f"Client {k} asks: write about the number {n}.",
                                 args.miss_tokens)
                started = time.perf_counter()
                reply = client.post("/v1/chat/completions", json=body)
                if reply.status_code == 200 and not stop.is_set():
                    misses.append(time.perf_counter() - started)

    threads = [threading.Thread(target=miss_loop, args=(k,)) for k in range(args.miss_clients)]
    for thread in threads:
        thread.start()
    time.sleep(args.ramp)  # the misses are decoding before the clock starts
    bodies = [json.dumps(chat_body(q, 8)) for q in warm]
    hit_clients = max(1, args.clients - args.miss_clients)
    before = httpx.get(f"{url}/health", timeout=60).json()
    cpu_before = thread_cpu(pid)
    hits = wrk(url, "/v1/chat/completions", bodies, hit_clients, args.seconds, folder)
    health = wrk(url, "/health", [], 1, args.seconds, folder)
    hit_figures, health_figures = result_of(hits), result_of(health)
    cpu = {name: round(t - cpu_before.get(name, 0.0), 2) for name, t in thread_cpu(pid).items()
           if t - cpu_before.get(name, 0.0) >= 0.01}
    final = httpx.get(f"{url}/health", timeout=60).json()
    # How fast the misses decoded while the hits were measured (the engine shares the GIL).
    decoded = final["batch"]["generated_tokens"] - before["batch"]["generated_tokens"]
    stop.set()
    for thread in threads:
        thread.join()
    ms = 1000
    miss_figures = ({"p50": statistics.median(misses) * ms, "p99": percentile(misses, 99) * ms,
                     "max": max(misses) * ms, "samples": len(misses)} if misses
                    else {"samples": 0})
    return {"model": final.get("model"), "clients": args.clients,
            "hit_clients": hit_clients, "miss_clients": args.miss_clients,
            "seconds": args.seconds, "hit_ms": hit_figures, "health_ms": health_figures,
            "miss_ms": miss_figures, "batch": final.get("batch"),
            # the event loop's CPU per request it answered (hits and /health)
            "loop_cpu_ms_per_request": round(cpu.get("loop", 0.0) * ms / max(
                1, hit_figures["samples"] + health_figures["samples"]), 3) if cpu else None,
            "thread_cpu_seconds": cpu,
            "miss_tokens_per_second": round(decoded / args.seconds, 1),
            "fast_path_hits": final["server"].get("fast_hits"),
            "decode_tokens_per_second": final.get("tokens_per_second")}


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"mlxc serve, {result['clients']} clients ({result['miss_clients']} "
                        f"asking new questions) — {result['model']}", title_justify="left")
    for column in ("what", "p50 ms", "p99 ms", "max ms", "samples"):
        table.add_column(column, justify="left" if column == "what" else "right")
    for name, key in (("cache hit", "hit_ms"), ("/health", "health_ms"), ("miss", "miss_ms")):
        f = result[key]
        if f["samples"]:
            table.add_row(name, f"{f['p50']:.1f}", f"{f['p99']:.1f}", f"{f['max']:.1f}",
                          str(f["samples"]))
    Console().print(table)
    print(f"misses decoded {result['miss_tokens_per_second']} tokens/s meanwhile")
    if result["loop_cpu_ms_per_request"] is not None:
        print(f"event loop CPU per request: {result['loop_cpu_ms_per_request']} ms")
    for key in ("hit_ms", "health_ms"):
        if result[key].get("not_ok"):
            print(f"warning: {result[key]['not_ok']} replies in {key} were not 200 hits")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="as `mlxc serve --model` (default: the default model)")
    parser.add_argument("--clients", type=int, default=32, help="keep-alive connections in all")
    parser.add_argument("--miss-clients", type=int, default=4,
                        help="of --clients, those asking new questions (misses)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--miss-tokens", type=int, default=64, help="max_tokens of a miss")
    parser.add_argument("--warm", type=int, default=20, help="questions answered beforehand")
    parser.add_argument("--ramp", type=float, default=2.0,
                        help="seconds the misses run before hits are measured")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("server_load.py drives hits with wrk: apt-get install wrk "
                         "(or brew install wrk), then run it again")
    with tempfile.TemporaryDirectory(prefix="mlxc-bench-") as tmp:
        proc, url = start_server(args.model, Path(tmp) / "cache", Path(tmp) / "server.log",
                                 args.startup_timeout, ("--max-queue", "256"))
        try:
            result = load(args, url, Path(tmp), proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result)


if __name__ == "__main__":
    main()

"""The first request after `mlxc serve` reports ready (target: <= 1 s on a GPU, where the
first generation of a process compiles kernels unless serve warms up first).

    python benchmarks/first_request.py [--model PATH] [--tokens 16] [--json]

Starts the real `mlxc serve` on a throwaway cache folder, waits for /health to say the model
is loaded, then times one streamed chat request (TTFT and end to end) and a second one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from concurrency_servers import chat  # noqa: E402
from shared import free_port  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: mlxc's default)")
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="mlxc-first-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXC_")}
    env.update(MLXC_CACHE_DIR=str(scratch / "cache"), MLXC_MODELS_DIR=str(scratch / "models"))
    port = free_port()
    cmd = [sys.executable, "-m", "mlxc", "serve", "--port", str(port)]
    if args.model:
        cmd += ["-m", args.model]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("model_loaded"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            if proc.poll() is not None:
                raise SystemExit("mlxc serve exited")
            time.sleep(0.1)
        ready = time.perf_counter() - started
        first = chat(url, "Write one sentence about the sea.", args.tokens)
        second = chat(url, "Write one sentence about the moon.", args.tokens)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    out = {"ready_seconds": round(ready, 2),
           "first": {"ttft": round(first["ttft"], 3), "e2e": round(first["e2e"], 3)},
           "second": {"ttft": round(second["ttft"], 3), "e2e": round(second["e2e"], 3)}}
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

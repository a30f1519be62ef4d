"""Probe: a flood of half-sent requests (slowloris) against a real `mlxc serve` on a tiny
random model. Reports the server's open files (peak and after), /health latency during the
flood and how much the server log grew. Issue 14's before/after figures come from it:

    PYTHONPATH=. .venv/bin/python benchmarks/diagnostics/slow_clients.py /tmp/slow 3000

Run it with an older tree on PYTHONPATH to compare. Linux only (/proc)."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from tiny_model import make_tiny_model  # noqa: E402


def main(root: Path, flood: int) -> None:
    model = root / "tiny"
    if not (model / "config.json").exists():
        make_tiny_model(model)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MLXC_MODEL": str(model), "MLXC_CACHE_DIR": str(root / "cache")}
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlxc", "serve", "--port", str(port)],
                                env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("model_loaded"):
                    break
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.2)
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, flood + 1024), hard))
        peak = [0]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], len(os.listdir(f"/proc/{proc.pid}/fd")))
                time.sleep(0.01)

        threading.Thread(target=sample, daemon=True).start()
        before = log_path.stat().st_size
        socks = []
        for _ in range(flood):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=5)
                s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                socks.append(s)
            except OSError:
                pass
        time.sleep(1)
        latencies = []
        for _ in range(5):
            started = time.perf_counter()
            try:
                status = httpx.get(f"{url}/health", timeout=10).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            latencies.append(f"{status} in {(time.perf_counter() - started) * 1000:.0f} ms")
        after = len(os.listdir(f"/proc/{proc.pid}/fd"))
        time.sleep(3)
        done.set()
        grew = log_path.stat().st_size - before
        print(f"half-sent requests: {len(socks)} of {flood}; server open files: peak {peak[0]},"
              f" after {after}; /health: {', '.join(latencies)}; log grew {grew} bytes")
        for s in socks:
            s.close()
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 3000)

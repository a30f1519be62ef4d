"""A real `mlxc serve` with the options a hardening test needs, on the tiny model."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
from live_server import free_port


@contextmanager
def mlxc_server(root: Path, model: Path, *args: str):
    """Yields (url, pid, log path); at exit the log must hold no traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXC_")}
    env.update(MLXC_MODEL=str(model), MLXC_CACHE_DIR=str(root / "cache"),
               MLXC_MODELS_DIR=str(root / "models"))
    port = free_port()
    log_path = root / "server.log"
    cmd = [sys.executable, "-m", "mlxc", "serve", "--port", str(port), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).json().get("model_loaded"):
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield url, proc.pid, log_path
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()

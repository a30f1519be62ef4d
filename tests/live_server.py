"""A real `mlxc serve` on a free loopback port, shared by the --url tests of warm and bench,
and a stand-in for a server that is not OpenAI-compatible."""

from __future__ import annotations

import http.server
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def served(tmp_path_factory, tiny_model):
    """(url, env): the server, and an environment whose `mlxc` shares its cache folder."""
    root = tmp_path_factory.mktemp("served")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXC_")}
    env.update(MLXC_MODEL=str(tiny_model), MLXC_CACHE_DIR=str(root / "cache"),
               MLXC_MODELS_DIR=str(root / "models"))
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlxc", "serve", "--port", str(port)],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.2)
        yield url, env
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert "Traceback" not in log_path.read_text(), log_path.read_text()


@pytest.fixture(scope="session")
def not_openai(tmp_path_factory):
    """A plain static-file HTTP server (of an empty folder): it answers, but no /v1/models."""
    empty = tmp_path_factory.mktemp("empty")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(empty), **kwargs)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()

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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Running:
    proc: subprocess.Popen
    url: str
    log: Path
    env: dict[str, str]


def start_server(root: Path, model: Path, *args: str, env: dict[str, str] | None = None
                 ) -> Running:
    """`python -m mlxc serve` on the model with its own cache folder, once it has loaded;
    `env` adds variables (MLXC_REDIS_URL, ...)."""
    extra = env or {}
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXC_")}
    env.update(MLXC_MODEL=str(model), MLXC_CACHE_DIR=str(root / "cache"),
               MLXC_MODELS_DIR=str(root / "models"), **extra)
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlxc", "serve", "--port", str(port), *args],
            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )
    running = Running(proc, f"http://127.0.0.1:{port}", log_path, env)
    deadline = time.monotonic() + 120
    while True:
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_server(running, check=False)
            raise AssertionError(log_path.read_text())
        try:  # /health says model_loaded also to a caller without the key
            if httpx.get(f"{running.url}/health", timeout=2).json().get("model_loaded"):
                return running
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.2)


def stop_server(running: Running, check: bool = True) -> None:
    """Stop it; with `check`, its log must hold no traceback."""
    if running.proc.poll() is None:
        running.proc.terminate()
        running.proc.wait(timeout=30)
    if check:
        text = running.log.read_text()
        assert "Traceback" not in text, text


@contextmanager
def running_server(root: Path, model: Path, *args: str, env: dict[str, str] | None = None):
    """Yields the Running server started with `args`; stops it and checks its log at exit."""
    running = start_server(root, model, *args, env=env)
    try:
        yield running
    finally:
        stop_server(running)


@contextmanager
def mlxc_server(root: Path, model: Path, *args: str):
    """Yields (url, pid, log path) of a server started with `args`; checks its log at exit."""
    with running_server(root, model, *args) as running:
        yield running.url, running.proc.pid, running.log


@pytest.fixture(scope="session")
def served(tmp_path_factory, tiny_model):
    """(url, env): the server, and an environment whose `mlxc` shares its cache folder."""
    with running_server(tmp_path_factory.mktemp("served"), tiny_model) as running:
        yield running.url, running.env


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


def all_at_once(count: int, work) -> list[str]:
    """`work(0..count-1)` on as many threads at the same time, each answer a string (a failure
    is shown by the assertion, with the others' answers)."""
    import threading

    said: list = [None] * count

    def one(n: int) -> None:
        try:
            said[n] = work(n)
        except BaseException as exc:  # noqa: BLE001  (shown by the assertion below)
            said[n] = exc
    threads = [threading.Thread(target=one, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert all(isinstance(s, str) for s in said), said
    return said

"""Redis going away while `mlxc serve` runs on it (a real redis-server, killed and started
again on the same port): requests are answered uncached (X-Mlxc-Cache: bypass), /health says
`degraded` with the reason, and answers are cached again once Redis is back and the
backoff has passed. `ask` answers without Redis too; `cache stats` says what is wrong."""

from __future__ import annotations

import shutil
import subprocess
import time

import httpx
import openai
import pytest
from conftest import run_mlxc
from live_server import start_server, stop_server
from test_full_disk import chat, repeated_until_hit
from test_redis_store import free_port

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


def redis_server(port: int) -> subprocess.Popen:
    """A throwaway redis-server on loopback, once it answers PING."""
    import redis

    server = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "",
         "--appendonly", "no"], stdout=subprocess.DEVNULL,
    )
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            return server
        except redis.ConnectionError:
            time.sleep(0.05)
    server.kill()
    raise AssertionError("redis-server did not start")


def stop(server: subprocess.Popen) -> None:
    server.kill()
    server.wait(10)


def test_serve_answers_uncached_while_redis_is_away(tmp_path, tiny_model):
    port = free_port()
    redis = redis_server(port)
    running = start_server(tmp_path, tiny_model,
                           env={"MLXC_REDIS_URL": f"redis://127.0.0.1:{port}/0"})
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="-", max_retries=0)
        assert chat(client, "Before?")[0] == "miss" and chat(client, "Before?")[0] == "hit"
        stop(redis)
        started = time.monotonic()
        for question in ("Before?", "During?", "During?"):
            status, text = chat(client, question)  # a 500 raises here
            assert status == "bypass" and isinstance(text, str)
        assert time.monotonic() - started < 30  # no request waits on redis-py's retries
        health = httpx.get(f"{running.url}/health", timeout=10).json()
        assert health["status"] == "degraded" and health["reason"] == "Redis is unreachable"
        assert "cannot reach Redis" in health["cache"]["error"]
        redis = redis_server(port)  # back, empty (no persistence)
        assert repeated_until_hit(client, "After?")[-1] == "hit"
        assert httpx.get(f"{running.url}/health", timeout=10).json()["status"] == "healthy"
    finally:
        stop_server(running)
        stop(redis)
    log = running.log.read_text()
    assert log.count("warning: cannot reach Redis") == 1, log  # per outage, not per request
    assert "works again" in log


def test_ask_answers_without_redis_and_stats_says_why(mlxc_env):
    env = {**mlxc_env, "MLXC_REDIS_URL": f"redis://127.0.0.1:{free_port()}/0"}
    asked = run_mlxc("ask", "No Redis?", "--max-tokens", "4", "--json", env=env)
    assert asked.returncode == 0, asked.stderr
    warnings = [line for line in asked.stderr.splitlines() if line.startswith("mlxc:")]
    assert len(warnings) == 1 and "cannot reach Redis" in warnings[0], asked.stderr
    assert '"cached": false' in asked.stdout
    stats = run_mlxc("cache", "stats", env=env)
    assert stats.returncode == 1 and "cannot reach Redis" in stats.stderr
    assert "Traceback" not in stats.stderr

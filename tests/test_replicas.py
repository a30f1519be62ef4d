"""Two `mlxc serve` replicas on one Redis behind a real HAProxy (examples/haproxy.cfg), as
docs/distributed.md sets them up: a repeated request is a hit whichever replica answers it
(the response cache is shared), and a conversation's follow-up, sent with its X-Session-Id,
lands on the replica that holds its prefix and reuses >= 90% of its prompt tokens."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from live_server import free_port, start_server, stop_server
from test_redis_outage import redis_server, stop

pytestmark = [
    pytest.mark.skipif(shutil.which("haproxy") is None,
                       reason="haproxy is not installed (scripts/install.sh --dev, "
                       "or apt-get install haproxy)"),
    pytest.mark.skipif(shutil.which("redis-server") is None,
                       reason="redis-server is not installed"),
]

CONFIG = Path(__file__).parent.parent / "examples" / "haproxy.cfg"
# A long opening turn, so that the follow-up's new tokens are a small share of its prompt.
OPENING = ("You review code. Keep answers short. " * 20).strip()


def haproxy(port: int, replicas: list[str]) -> subprocess.Popen:
    """HAProxy on the example config, once both replicas pass its health check."""
    env = {**os.environ, "MLXC_LB_BIND": f"127.0.0.1:{port}",
           "MLXC_REPLICA1": replicas[0], "MLXC_REPLICA2": replicas[1]}
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(CONFIG)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seen: set[str] = set()
    deadline = time.monotonic() + 30
    while len(seen) < 2 and time.monotonic() < deadline and proc.poll() is None:
        try:  # no session header: round-robin, so both replicas answer in turn
            seen.add(httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
                     .headers.get("x-mlxc-replica", ""))
        except httpx.HTTPError:
            time.sleep(0.2)
    if seen != {"replica1", "replica2"}:
        proc.kill()
        raise AssertionError(f"haproxy did not reach both replicas: {seen} "
                             f"{proc.stderr.read().decode() if proc.poll() is not None else ''}")
    return proc


def ask(url: str, messages: list[dict], session: str) -> httpx.Response:
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=120,
                       headers={"X-Session-Id": session},
                       json={"model": "tiny-llama", "messages": messages, "max_tokens": 8,
                             "temperature": 0})
    assert reply.status_code == 200, reply.text
    return reply


def reused(reply: httpx.Response) -> tuple[int, int]:
    """(reused, prompt tokens) from X-Mlxc-Prefix: 'reused=a/b; tier=...'."""
    match = re.match(r"reused=(\d+)/(\d+)", reply.headers["x-mlxc-prefix"])
    assert match, reply.headers
    return int(match[1]), int(match[2])


def test_replicas_behind_haproxy_share_hits_and_keep_conversations(tmp_path, tiny_model):
    redis_port = free_port()
    redis = redis_server(redis_port)
    env = {"MLXC_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    # Each replica its own cache folder (so its own prefix folder), as on two hosts.
    replicas = []
    balancer = None
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            replicas.append(start_server(tmp_path / name, tiny_model, env=env))
        lb_port = free_port()
        balancer = haproxy(lb_port, [r.url.removeprefix("http://") for r in replicas])
        url = f"http://127.0.0.1:{lb_port}"

        # Conversations: each session's follow-up on the replica of its first turn.
        by_replica: dict[str, int] = {}
        for n in range(6):
            session = f"conv-{n}"
            turn = [{"role": "system", "content": OPENING},
                    {"role": "user", "content": f"Question {n}: what does line {n} do?"}]
            first = ask(url, turn, session)
            where = first.headers["x-mlxc-replica"]
            by_replica[where] = by_replica.get(where, 0) + 1
            answer = first.json()["choices"][0]["message"]["content"]
            turn += [{"role": "assistant", "content": answer},
                     {"role": "user", "content": "And the next one?"}]
            follow = ask(url, turn, session)
            assert follow.headers["x-mlxc-replica"] == where
            assert follow.headers["x-mlxc-cache"] == "miss"
            got, total = reused(follow)
            assert got >= 0.9 * total, (session, follow.headers["x-mlxc-prefix"])
            print(f"{session} on {where}: {follow.headers['x-mlxc-prefix']}")
        assert set(by_replica) == {"replica1", "replica2"}, by_replica  # both were used
        # Why the affinity matters: the same kind of follow-up sent straight to the replica
        # that did not see the first turn reuses only what it shares with the others.
        other = replicas[0 if where == "replica2" else 1].url
        turn[1]["content"] = "Question 99: a turn the other replica never saw."
        cold_got, cold_total = reused(ask(other, turn, "direct"))
        assert cold_got < 0.9 * cold_total, (cold_got, cold_total)

        # Repeats: the same request asked under new sessions until both replicas answered it.
        turn = [{"role": "user", "content": "Is a repeat a hit on either replica?"}]
        assert ask(url, turn, "first").headers["x-mlxc-cache"] == "miss"
        answered: dict[str, str] = {}
        for n in range(40):
            reply = ask(url, turn, f"repeat-{n}")
            assert reply.headers["x-mlxc-cache"] == "hit", reply.headers
            answered.setdefault(reply.headers["x-mlxc-replica"], reply.text)
            if len(answered) == 2:
                break
        assert set(answered) == {"replica1", "replica2"}
    finally:
        if balancer is not None:
            balancer.kill()
            balancer.wait(10)
        for running in replicas:
            stop_server(running)
        stop(redis)

"""`mlxc bench --url A --url B` against two real `mlxc serve` replicas (each its own cache):
conversations go round-robin, each stays on one server, so repeats are hits and follow-ups
reuse their prefix on the server that answered their first turn."""

from __future__ import annotations

import json

from conftest import run_mlxc
from live_server import start_server, stop_server

from mlxc.bench_servers import session_id
from mlxc.request import GenerationRequest


def test_a_follow_up_has_its_first_turns_session():
    first = GenerationRequest(messages=[{"role": "system", "content": "Be brief."},
                                        {"role": "user", "content": "Hi?"}])
    follow = first.model_copy(update={"messages": [
        *first.messages, {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "And?"}]})
    other = GenerationRequest(messages=[{"role": "user", "content": "Hi?"}])
    assert session_id(first) == session_id(follow) != session_id(other)


def test_bench_round_robins_conversations_over_two_servers(tmp_path, tiny_model):
    servers = []
    try:
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
            servers.append(start_server(tmp_path / name, tiny_model))
        urls = [s.url for s in servers]
        out = tmp_path / "bench.json"
        env = {**servers[0].env, "MLXC_CACHE_DIR": str(tmp_path / "client")}
        result = run_mlxc("bench", "-n", "4", "-c", "2", "--max-tokens", "8",
                          "--url", urls[0], "--url", urls[1], "--json", str(out), env=env)
        assert result.returncode == 0, result.stderr
        report = json.loads(out.read_text())
    finally:
        for running in servers:
            stop_server(running)
    samples = report["samples"]
    assert report["scenarios"]["hit"]["cache"] == {"hit": 4}  # each repeat on its own server
    assert report["scenarios"]["follow-up"]["cached_tokens"] > 0
    for name in ("miss", "hit", "follow-up"):
        assert {s["server"] for s in samples[name]} == set(urls), name  # both were used
    for miss, hit, follow in zip(samples["miss"], samples["hit"], samples["follow-up"],
                                 strict=True):
        assert miss["server"] == hit["server"] == follow["server"]
        assert follow["cached_tokens"] > 0
    assert f"{urls[0]} " in result.stderr and "servers:" in result.stderr

"""Continuous batching on a sharded model (`mlxc serve --shards 2 --max-batch 4`): two CPU
ranks over MLX's ring backend on loopback, started by the server and stopped by the test.
Rank 0's batch merges, pads, filters, extends, extracts and copies caches between model calls;
every rank does the same to its shard's cache (distributed/cache_ops.py), so concurrent
requests answer as one process batching them does, for tensor (tiny llama) and pipeline
(tiny qwen2) parallel, and sequences that join and leave a running batch (finished, or
cancelled by their client) leave the others' answers as they were."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
import pytest
from live_server import all_at_once, start_server, stop_server
from test_distributed_serve import lively_llama, tiny_qwen2  # noqa: F401  (fixtures)

# Of different lengths, every other one past the 512-token prefill step (a burst of short and
# long prompts is prefilled in two passes for the long ones: the batch is split and copied
# when the short ones' prompts are in), and with different max_tokens: sequences leave at
# different steps, waiting ones join.
PROMPTS = [(f"Question {n}: what is {n} plus {n}? " + "Think it over. " * (3 * n)
            + ("Count the foxes: " + "fox and dog " * (150 + 5 * n)) * (n % 2), 4 + 3 * n)
           for n in range(8)]


def chat(url: str, text: str, max_tokens: int) -> str:
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json={
        "model": "tiny", "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["message"]["content"]


def at_once(url: str) -> list[str]:
    """Every prompt sent at the same time (four run together, the rest wait their turn)."""
    return all_at_once(len(PROMPTS), lambda n: chat(url, *PROMPTS[n]))


def serving(root: Path, model: Path, scenario, *args: str) -> tuple[object, dict]:
    root.mkdir()
    server = start_server(root, model, "--max-batch", "4", "--speculate", "off", "--alias",
                          "*", *args)
    try:
        result = scenario(server.url)
        health = httpx.get(f"{server.url}/health", timeout=5).json()
    finally:
        stop_server(server)
    return result, health


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_concurrent_requests_answer_as_one_process_batching_them(
        tmp_path, lively_llama, tiny_qwen2, parallel):  # noqa: F811
    model = lively_llama if parallel == "tensor" else tiny_qwen2
    one, plain = serving(tmp_path / "one", model, at_once)
    two, health = serving(tmp_path / "two", model, at_once, "--shards", "2", "--parallel",
                          parallel)
    assert len(set(one)) > 1, one  # answers that depend on the prompt
    assert two == one
    sizes = health["batch"]["batch_sizes"]
    assert max(int(k) for k in sizes) >= 3, sizes  # they really ran together
    ops = health["world"]["mirrored_cache_ops"]
    assert {"merge", "extract", "filter", "copy"} <= set(ops), ops
    print(parallel, sizes, ops)


def join_and_leave(url: str) -> dict[str, str]:
    """A long answer streams alone; one request joins it and finishes (leaves) while it runs,
    another joins and is cancelled by its client; then the long one ends alone."""
    out: dict[str, str] = {}
    streamed = threading.Event()

    def long() -> None:
        text = []
        with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
                "model": "tiny", "messages": [{"role": "user", "content": "Tell a story."}],
                "max_tokens": 400, "temperature": 0, "ignore_eos": True,
                "stream": True}) as reply:
            for n, line in enumerate(reply.iter_lines()):
                if n == 3:
                    streamed.set()
                if line.startswith("data: {"):
                    import json

                    choice = json.loads(line[6:])["choices"]
                    text += [c["delta"].get("content") or "" for c in choice]
        out["long"] = "".join(text)

    runner = threading.Thread(target=long)
    runner.start()
    assert streamed.wait(60)
    out["short"] = chat(url, "What is MLX?", 6)  # joins the long one, leaves before it
    with httpx.stream("POST", f"{url}/v1/chat/completions", timeout=120, json={
            "model": "tiny", "messages": [{"role": "user", "content": "Paris?"}],
            "max_tokens": 100, "temperature": 0, "ignore_eos": True,
            "stream": True}) as reply:
        for n, _ in enumerate(reply.iter_lines()):
            if n == 4:
                break  # the client goes: the batch lets this one go mid-decode
    time.sleep(0.2)
    out["after"] = chat(url, "And the dog?", 5)
    runner.join(120)
    return out


def test_joins_and_leaves_mid_decode_keep_the_answers(tmp_path, lively_llama):  # noqa: F811
    one, _ = serving(tmp_path / "one", lively_llama, join_and_leave)
    two, health = serving(tmp_path / "two", lively_llama, join_and_leave, "--shards", "2")
    assert len(one["long"]) > 100, one
    assert two == one
    batch = health["batch"]
    assert batch["batch_sizes"].get("2") and batch["back_alone"] >= 1, batch
    ops = health["world"]["mirrored_cache_ops"]
    assert {"merge", "extract", "filter"} <= set(ops), ops

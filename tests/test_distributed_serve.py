"""`mlxc serve --shards 2`: two CPU ranks over MLX's ring backend on loopback, started by the
server and stopped by the test (bounded time). Greedy answers through the openai client equal a
one-process `mlxc serve`'s: tensor parallel on the tiny llama (4 query / 2 KV heads), pipeline
parallel on a tiny qwen2 made here (mlx-lm's llama has no pipeline). A dead rank ends the
server with a clear error (tests/test_distributed_lost.py). Batching on the sharded model:
tests/test_distributed_batch.py."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import httpx
import pytest
from live_server import start_server, stop_server
from openai import OpenAI
from tiny_model import rescaled_copy

PROMPTS = [f"Question {n}: what is {n} plus {n}?" for n in range(10)]


@pytest.fixture(scope="module")
def lively_llama(tiny_model, tmp_path_factory) -> Path:
    return rescaled_copy(tiny_model, tmp_path_factory.mktemp("m") / "lively", 4.0)


@pytest.fixture(scope="module")
def tiny_qwen2(tiny_model, tmp_path_factory) -> Path:
    """A random 4-layer qwen2 (mlx-lm's PipelineMixin) on the tiny llama's tokenizer."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_map
    from mlx_lm.models import qwen2
    from mlx_lm.utils import save_config, save_model

    folder = tmp_path_factory.mktemp("m") / "qwen2"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns(
        "*.safetensors", "*.safetensors.index.json", "config.json", ".mlxc-*"))
    config = {**json.loads((tiny_model / "config.json").read_text()),
              "model_type": "qwen2", "num_hidden_layers": 4}
    mx.random.seed(1)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))
    model.update(tree_map(lambda w: w * 4.0 if w.ndim == 2 else w, model.parameters()))
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, folder / "config.json")
    assert tree_flatten(model.parameters())
    return folder


@pytest.fixture(scope="module")
def three_head_llama(tiny_model, tmp_path_factory) -> Path:
    """A random 4-layer llama with 3 query / 3 KV heads (as SmolLM2-135M's 9 / 3, they do not
    split over 2 ranks): mlx-lm's llama has no pipeline, mlxc's (distributed/pipeline.py) does."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    folder = tmp_path_factory.mktemp("m") / "llama3h"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns(
        "*.safetensors", "*.safetensors.index.json", "config.json", ".mlxc-*"))
    config = {**json.loads((tiny_model / "config.json").read_text()), "num_hidden_layers": 4,
              "num_attention_heads": 3, "num_key_value_heads": 3, "hidden_size": 48}
    mx.random.seed(2)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.update(tree_map(lambda w: w * 4.0 if w.ndim == 2 else w, model.parameters()))
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return folder


def answers(url: str) -> list[str]:
    client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)
    return [client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": text}], max_tokens=10,
        temperature=0).choices[0].message.content for text in PROMPTS]


def served(root: Path, model: Path, *args: str) -> tuple[list[str], dict]:
    root.mkdir()
    server = start_server(root, model, "--max-batch", "1", "--speculate", "off", "--alias",
                          "*", *args)
    try:
        said = answers(server.url)
        health = httpx.get(f"{server.url}/health", timeout=5).json()
    finally:
        stop_server(server)
    return said, health


@pytest.mark.parametrize("parallel", ["tensor", "pipeline", "auto"])
def test_two_ring_ranks_answer_as_one_process(tmp_path, lively_llama, tiny_qwen2,
                                              three_head_llama, parallel):
    """auto on a llama whose heads do not split over 2: pipeline, said in the log."""
    model = {"tensor": lively_llama, "pipeline": tiny_qwen2, "auto": three_head_llama}[parallel]
    one, plain = served(tmp_path / "one", model)
    two, health = served(tmp_path / "two", model, "--shards", "2", "--parallel", parallel)
    assert "world" not in plain
    world = health["world"]
    layout = "pipeline" if parallel == "auto" else parallel
    assert (world["ranks"], world["backend"], world["parallel"]) == (2, "ring", layout)
    if parallel == "auto":
        log = (tmp_path / "two" / "server.log").read_text()
        assert "3 query / 3 key-value heads do not split over 2 ranks" in log, log
    assert len(world["hosts"]) == 2 and world["mirrored_calls"] > len(PROMPTS)
    assert len(set(one)) > 1, one  # answers that depend on the prompt
    assert two == one


def chat(url: str, messages: list[dict]) -> tuple[str, int, int, str]:
    """(answer, reused, prompt tokens, tier) from one greedy request."""
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": messages, "max_tokens": 8, "temperature": 0})
    assert reply.status_code == 200, reply.text
    head = reply.headers["x-mlxc-prefix"]  # reused=a/b; tier=...
    reused, total = head.split(";")[0].removeprefix("reused=").split("/")
    return reply.json()["choices"][0]["message"]["content"], int(reused), int(total), head


def test_each_rank_keeps_its_prefix_blocks_across_a_restart(tmp_path, lively_llama):
    opening = [{"role": "system", "content": "You review code. Keep answers short. " * 12},
               {"role": "user", "content": "What does add(a, b) return?"}]

    def turns(first_answer: str) -> list[list[dict]]:
        return [opening + [{"role": "assistant", "content": first_answer},
                           {"role": "user", "content": question}]
                for question in ("And add(2, 3)?", "And add(4, 5)?")]

    (tmp_path / "one").mkdir()
    plain = start_server(tmp_path / "one", lively_llama, "--max-batch", "1", "--alias", "*")
    try:
        first = chat(plain.url, opening)[0]
        expected = [chat(plain.url, turn)[0] for turn in turns(first)]
    finally:
        stop_server(plain)
    root = tmp_path / "two"
    root.mkdir()
    sharded = start_server(root, lively_llama, "--shards", "2", "--alias", "*")
    try:
        assert chat(sharded.url, opening)[0] == first
        follow_up = turns(first)[0]
        answer, reused, total, head = chat(sharded.url, follow_up)
        assert answer == expected[0]
        print(head)
        assert reused >= 0.8 * total, head  # both ranks held the first turn's blocks
    finally:
        stop_server(sharded)  # every rank writes its last blocks
    assert list((root / "cache" / "ranks" / "1" / "prefix").iterdir())
    sharded = start_server(root, lively_llama, "--shards", "2", "--alias", "*")
    try:  # both ranks restarted: each finds its own blocks on disk
        answer, reused, total, head = chat(sharded.url, turns(first)[1])
        assert answer == expected[1]
        print(head)
        assert reused >= 0.7 * total and "disk" in head, head
    finally:
        stop_server(sharded)

"""Speculative decoding on a sharded model (`mlxc serve --shards 2`, two CPU ranks over MLX's
ring backend on loopback): the verify pass is a model call like any other (mirrored), and its
cuts of the KV (the lone loop's trim; the batch's trim and right-padding roll) are mirrored
with the batch's cache operations, so greedy answers with Predicted Outputs and prompt lookup
equal a one-process server's with speculation off, alone and four at a time in the batch,
for tensor (tiny llama) and pipeline (tiny qwen2) parallel."""

from __future__ import annotations

import httpx
import pytest
from live_server import all_at_once, start_server, stop_server
from test_distributed_serve import lively_llama, tiny_qwen2  # noqa: F401  (fixtures)

# Code-edit-like requests: a function to rewrite, its text repeated in the prompt (prompt
# lookup finds n-grams there), max_tokens apart so rows leave the batch at different steps.
CODE = "def add(a, b):\n    return a + b\n\n\ndef mul(a, b):\n    return a * b\n"
EDITS = [(f"Rename the functions to f{n} and g{n}:\n```python\n{CODE}```\n" + CODE * (n % 2),
          24 + 6 * n) for n in range(4)]


def ask(url: str, text: str, max_tokens: int, prediction: str | None = None) -> dict:
    body = {"model": "tiny", "messages": [{"role": "user", "content": text}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
    if prediction is not None:
        body["prediction"] = {"type": "content", "content": prediction}
    reply = httpx.post(f"{url}/v1/chat/completions", timeout=120, json=body,
                       headers={"Cache-Control": "no-cache"})
    assert reply.status_code == 200, reply.text
    return reply.json()


def text_of(reply: dict) -> str:
    return reply["choices"][0]["message"]["content"]


def together(url: str, predictions: list[str | None]) -> list[str]:
    return all_at_once(len(EDITS), lambda n: text_of(ask(url, *EDITS[n], predictions[n])))


def mangled(text: str) -> str:
    """A prediction right for its first half only: drafts accepted, then rejected (cut)."""
    half = len(text) // 2
    return text[:half] + text[half:][::-1]


@pytest.mark.parametrize("parallel", ["tensor", "pipeline"])
def test_speculation_on_a_sharded_model_answers_as_one_process_without_it(
        tmp_path, lively_llama, tiny_qwen2, parallel):  # noqa: F811
    model = lively_llama if parallel == "tensor" else tiny_qwen2
    (tmp_path / "one").mkdir()
    plain = start_server(tmp_path / "one", model, "--max-batch", "4", "--speculate", "off",
                         "--alias", "*")
    try:
        expected = [text_of(ask(plain.url, *edit)) for edit in EDITS]
    finally:
        stop_server(plain)
    assert len(set(expected)) > 1, expected
    (tmp_path / "two").mkdir()
    sharded = start_server(tmp_path / "two", model, "--shards", "2", "--parallel", parallel,
                           "--max-batch", "4", "--speculate", "auto", "--alias", "*")
    try:
        alone = [ask(sharded.url, *EDITS[n], prediction)
                 for n, prediction in enumerate([expected[0], mangled(expected[1]), None])]
        assert [text_of(r) for r in alone] == expected[:3]
        # Drafts were verified and cut back (a random model's text may tokenize otherwise
        # than it was generated, so how many are taken varies: the answers must not).
        details = [r["usage"]["completion_tokens_details"] for r in alone[:2]]
        assert sum(d["rejected_prediction_tokens"] for d in details) > 0, details
        batched = together(sharded.url, [expected[0], mangled(expected[1]), None, expected[3]])
        assert batched == expected
        health = httpx.get(f"{sharded.url}/health", timeout=5).json()
    finally:
        stop_server(sharded)
    speculation = health["batch"]["speculation"]
    print(parallel, speculation, health["batch"]["batch_sizes"],
          health["world"]["mirrored_cache_ops"])
    assert speculation["drafted"] > speculation["accepted"] >= 0
    # They shared the batch; how many at once depends on timing: a request whose prediction
    # is its whole answer can finish before the last one joins (3 of 5 runs reached 3).
    assert max(int(k) for k in health["batch"]["batch_sizes"]) >= 2
    assert "trim" in health["world"]["mirrored_cache_ops"]

"""A full batch and queue answer 503 with Retry-After, in each API's own error shape, to the
real openai and anthropic clients; /health and /metrics show the batch."""

from __future__ import annotations

import time

import anthropic
import httpx
import openai
import pytest
from live_server import mlxc_server


@pytest.fixture(scope="module")
def tight_server(tmp_path_factory, tiny_model):
    """`mlxc serve --max-batch 1 --max-queue 0`: one sequence at a time, nobody waits."""
    root = tmp_path_factory.mktemp("tight")
    with mlxc_server(root, tiny_model, "--max-batch", "1", "--max-queue", "0") as (url, _, _):
        yield url


def test_a_full_server_answers_503_with_retry_after_in_each_shape(tight_server):
    url = tight_server
    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
    holder = oai.chat.completions.create(  # a long stream takes the only place
        model="default", max_tokens=3000, stream=True,
        messages=[{"role": "user", "content": "hold the batch"}],
    )
    next(iter(holder))
    health = httpx.get(f"{url}/health", timeout=5).json()
    assert health["batch"]["running"] == 1, health

    with pytest.raises(openai.APIStatusError) as refused:
        oai.chat.completions.create(
            model="default", max_tokens=4, messages=[{"role": "user", "content": "one more"}]
        )
    assert refused.value.status_code == 503
    assert int(refused.value.response.headers["retry-after"]) >= 1
    error = refused.value.response.json()["error"]
    assert error["code"] == "overloaded" and error["type"] == "server_error"

    ant = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=30)
    with pytest.raises(anthropic.APIStatusError) as refused:
        ant.messages.create(
            model="default", max_tokens=4, messages=[{"role": "user", "content": "and one"}]
        )
    assert refused.value.status_code == 503
    assert int(refused.value.response.headers["retry-after"]) >= 1
    body = refused.value.response.json()
    assert body["type"] == "error" and body["error"]["type"] == "overloaded_error"

    holder.close()  # the client leaves: its sequence stops, the place is free
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/health", timeout=5).json()["batch"]["running"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    assert 'mlxc_batch_size_bucket{le="1"}' in metrics and "mlxc_running_sequences 0" in metrics
    # Room again: the next request is served.
    answer = oai.chat.completions.create(
        model="default", max_tokens=4, messages=[{"role": "user", "content": "one more"}]
    )
    assert answer.choices[0].finish_reason in ("stop", "length")

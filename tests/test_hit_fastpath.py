"""The fast path for repeated cache hits (mlxc/server/fastpath.py, issue 30, point 7): a
body seen before is answered without routing or parsing, with the normal route's bytes and
headers, counted as the normal route counts, and never from anything the store no longer
holds (a cleared cache, an expired entry). On the default model through a real `mlxc serve`
and the real openai and anthropic clients; the TTL case in-process on the tiny model.

A request with `Cache-Control: max-age=...` takes the normal route (the fast path leaves
every Cache-Control to it) yet is an ordinary hit there: that is the reference answer."""

from __future__ import annotations

import asyncio
import re
import time

import anthropic
import httpx
import openai
import pytest
from conftest import run_mlxc
from live_server import start_server, stop_server

from mlxc.config import Settings
from mlxc.server.app import create_app
from mlxc.server.state import ServerOptions
from mlxc.service import Service

KEY = "fast-key"
NORMAL = {"Cache-Control": "max-age=3600"}  # the normal route, reading the cache as usual
# What differs between two answers to one question: the response id and its second.
_VOLATILE = re.compile(rb'("id":"(?:chatcmpl-|cmpl-|msg_)[0-9a-f]{32}"|"created":\d+)')


def same_bytes(a: bytes, b: bytes) -> bool:
    return _VOLATILE.sub(b"", a) == _VOLATILE.sub(b"", b)


def headers_of(response: httpx.Response) -> dict[str, str]:
    return {k: v for k, v in response.headers.items() if k != "date"}


@pytest.fixture(scope="module")
def running(smollm_folder, tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("fast"), smollm_folder, "--api-key", KEY)
    try:
        yield running
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
def oai(running) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{running.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ant(running) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=running.url, api_key=KEY, max_retries=0, timeout=120)


def figures(running) -> dict:
    return httpx.get(f"{running.url}/health", headers={"x-api-key": KEY}, timeout=30).json()


def stored(running, items: int) -> None:
    """Wait until the store holds `items` answers (a miss is stored as its reply ends)."""
    deadline = time.monotonic() + 30
    while figures(running)["cache"]["cached_items"] < items:
        assert time.monotonic() < deadline
        time.sleep(0.05)


def fast_hits(running) -> int:
    return figures(running)["server"]["fast_hits"]


def three_times(running, send) -> list[tuple[httpx.Response, bytes]]:
    """A miss, the normal route's hit, then the fast path's hit of the same request (a
    question of its own: plain and streamed share a key); `send` returns (response, whole
    body) and takes extra headers."""
    items = figures(running)["cache"]["cached_items"]
    miss = send({})
    stored(running, items + 1)
    before = fast_hits(running)
    normal = send(NORMAL)
    assert fast_hits(running) == before  # Cache-Control: the normal route answered
    fast = send({})
    assert fast_hits(running) == before + 1  # and this one the fast path
    assert [r.headers["x-mlxc-cache"] for r, _ in (miss, normal, fast)] == ["miss", "hit", "hit"]
    return [miss, normal, fast]


def test_openai_plain_and_stream_answers_are_the_normal_routes_bytes(running, oai):
    def plain(headers):
        raw = oai.chat.completions.with_raw_response.create(
            model="default", max_tokens=8, temperature=0, extra_headers=headers,
            messages=[{"role": "user", "content": "Name one planet."}])
        return raw.http_response, raw.http_response.content

    (miss, miss_body), (normal, normal_body), (fast, fast_body) = three_times(running, plain)
    assert same_bytes(normal_body, fast_body)
    assert headers_of(normal) == headers_of(fast)  # content-type, length, X-Mlxc-* alike
    assert fast.headers["content-type"] == "application/json"
    chat = openai.types.chat.ChatCompletion.model_validate_json(fast_body)
    first = openai.types.chat.ChatCompletion.model_validate_json(miss_body)
    assert chat.choices[0].message.content == first.choices[0].message.content  # greedy
    assert chat.usage.prompt_tokens_details.cached_tokens == chat.usage.prompt_tokens

    def stream(headers):
        with oai.chat.completions.with_streaming_response.create(
                model="default", max_tokens=8, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_headers=headers,
                messages=[{"role": "user", "content": "Name one moon."}]) as reply:
            return reply.http_response, reply.read()

    (_, miss_events), (normal, normal_events), (fast, fast_events) = three_times(running, stream)
    assert same_bytes(normal_events, fast_events) and fast_events.endswith(b"data: [DONE]\n\n")
    assert headers_of(normal) == headers_of(fast)
    assert fast.headers["content-type"].startswith("text/event-stream")


def test_completions_and_anthropic_answers_are_the_normal_routes_bytes(running, oai, ant):
    def completion(headers):
        raw = oai.completions.with_raw_response.create(
            model="default", prompt="The capital of France is", max_tokens=6, temperature=0,
            extra_headers=headers)
        return raw.http_response, raw.http_response.content

    _, (normal, normal_body), (fast, fast_body) = three_times(running, completion)
    assert same_bytes(normal_body, fast_body) and headers_of(normal) == headers_of(fast)

    def message(headers):
        raw = ant.messages.with_raw_response.create(
            model="default", max_tokens=8, system="Answer briefly.", extra_headers=headers,
            messages=[{"role": "user", "content": "Name a metal."}])
        return raw.http_response, raw.http_response.content

    _, (normal, normal_body), (fast, fast_body) = three_times(running, message)
    assert same_bytes(normal_body, fast_body) and headers_of(normal) == headers_of(fast)
    assert anthropic.types.Message.model_validate_json(fast_body).usage.cache_read_input_tokens

    def stream(headers):
        with ant.messages.with_streaming_response.create(
                model="default", max_tokens=8, stream=True, extra_headers=headers,
                messages=[{"role": "user", "content": "Name a gas."}]) as reply:
            return reply.http_response, reply.read()

    _, (normal, normal_events), (fast, fast_events) = three_times(running, stream)
    assert same_bytes(normal_events, fast_events) and b"event: message_stop" in fast_events
    assert headers_of(normal) == headers_of(fast)


def test_counted_guarded_and_never_served_once_cleared(running, oai):
    question = {"model": "default", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Name one ocean."}]}
    url, auth = f"{running.url}/v1/chat/completions", {"Authorization": f"Bearer {KEY}"}
    items = figures(running)["cache"]["cached_items"]
    first = httpx.post(url, json=question, headers=auth, timeout=120)
    assert first.headers["x-mlxc-cache"] == "miss"
    stored(running, items + 1)
    before = figures(running)
    for _ in range(3):
        again = httpx.post(url, json=question, headers=auth, timeout=120)
        assert again.headers["x-mlxc-cache"] == "hit"
        assert again.json()["choices"] == first.json()["choices"]
    after = figures(running)
    assert after["server"]["fast_hits"] == before["server"]["fast_hits"] + 3
    assert after["cache"]["hits"] == before["cache"]["hits"] + 3  # the store counted them
    assert after["server"]["replies"]["hit"] == before["server"]["replies"]["hit"] + 3
    metrics = httpx.get(f"{running.url}/metrics", headers=auth, timeout=30).text
    assert f"mlxc_fast_path_hits_total {after['server']['fast_hits']}" in metrics

    # The same bytes still pass every check of the normal route.
    wrong = httpx.post(url, json=question, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
    foreign = httpx.post(url, json=question, headers={**auth, "Origin": "http://evil.example"})
    assert foreign.status_code == 403
    fresh = httpx.post(url, json=question, headers={**auth, "Cache-Control": "no-cache"},
                       timeout=120)
    assert fresh.headers["x-mlxc-cache"] == "miss"  # no-cache: generated again
    assert fresh.json()["choices"] == first.json()["choices"]
    assert figures(running)["server"]["fast_hits"] == after["server"]["fast_hits"]

    cleared = run_mlxc("cache", "clear", "--responses-only", "--yes", env=running.env)
    assert cleared.returncode == 0, cleared.stderr
    assert figures(running)["cache"]["cached_items"] == 0
    again = httpx.post(url, json=question, headers=auth, timeout=120)
    assert again.headers["x-mlxc-cache"] == "miss"  # not served from the fast path's memory
    assert again.json()["choices"] == first.json()["choices"]
    assert figures(running)["server"]["fast_hits"] == after["server"]["fast_hits"]


def test_an_expired_answer_is_not_served(tmp_path, tiny_model):
    service = Service(Settings(model=str(tiny_model), cache_dir=tmp_path / "cache",
                               models_dir=tmp_path / "models", ttl_seconds=1.0))
    app = create_app(service, ServerOptions())
    question = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
                "temperature": 0}

    async def run() -> list[str]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app),
                                     base_url="http://127.0.0.1", timeout=120) as client:
            seen = []
            for wait in (0, 0, 0, 1.3):
                await asyncio.sleep(wait)
                reply = await client.post("/v1/chat/completions", json=question)
                seen.append(reply.headers["x-mlxc-cache"])
                while wait == 0 and not service.store.stats().cached_items:
                    await asyncio.sleep(0.01)  # a miss is stored as its reply ends
            return seen

    try:
        seen = asyncio.run(run())
        fast = app.state.mlxc.metrics.fast_hits
    finally:
        service.close()
    assert seen == ["miss", "hit", "hit", "miss"]
    assert fast == 2  # both hits by the fast path; the expired one was generated again

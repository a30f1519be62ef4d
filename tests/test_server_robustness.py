"""`mlxc serve` under load and abuse: single flight, keep-alives, disconnects, auth, bad
input, health and metrics. Uses the session's server from test_server_api.py."""

# The fixtures are imported from test_server_api (one server for both files), and pytest
# passes them as arguments of the same names, which ruff reads as redefinitions.
# ruff: noqa: F811

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import anthropic
import httpx
import openai
import pytest
from test_server_api import KEY, MODEL, ant, chat, health, oai, post, server, server_log  # noqa: F401


@contextmanager
def engine_busy(server):
    """A long streamed generation holds the engine while the block runs, so that requests
    made meanwhile wait in its queue; leaving hangs up, which cancels it."""
    body = {"prompt": f"blocker {time.time()}", "max_tokens": 5000, "stream": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Cache-Control": "no-store"}) as r:
        lines = r.iter_lines()  # kept: closing this iterator would hang up at once
        next(line for line in lines if line.startswith("data: "))  # the blocker is running
        yield
    wait_until(lambda: health(server)["queue_depth"] == 0)


def wait_until(condition, seconds=20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# -- concurrency --------------------------------------------------------------------------


def test_identical_concurrent_requests_run_once(server, oai):
    before = health(server)["server"]
    with ThreadPoolExecutor(4) as pool:
        with engine_busy(server):
            futures = [pool.submit(chat, oai, "Single flight please", 12) for _ in range(4)]
            wait_until(lambda: health(server)["server"]["shared"] - before["shared"] == 3)
        results = [f.result() for f in futures]
    after = health(server)["server"]
    assert {status for status, _ in results} == {"miss"}
    assert len({r.choices[0].message.content for _, r in results}) == 1
    started = sum(after["generations"].values()) - sum(before["generations"].values())
    assert started == 2  # the blocker and one run for the four identical requests


def test_keepalive_comments_while_waiting_for_the_engine(server):
    lines = []
    with engine_busy(server):
        with httpx.stream("POST", f"{server}/v1/chat/completions", timeout=60,
                          headers={"Authorization": f"Bearer {KEY}"},
                          json={"model": MODEL, "max_tokens": 4, "stream": True,
                                "messages": [{"role": "user", "content": "Keep me alive"}]}) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                lines.append(line)
                if lines.count(": keep-alive") == 3:
                    break
    data = [line for line in lines if line.startswith("data: ")]
    assert len(data) == 1 and '"role":"assistant"' in data[0]  # nothing but the opening chunk


def test_disconnect_cancels_generation_and_caches_nothing(server):
    before = health(server)
    body = {"model": MODEL, "max_tokens": 3000, "stream": True,
            "messages": [{"role": "user", "content": "Write a very long story"}]}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        data_lines = 0
        for line in r.iter_lines():
            data_lines += line.startswith("data: ")
            if data_lines >= 4:
                break
    deadline = time.monotonic() + 20
    while health(server)["server"]["generations"].get("cancelled", 0) == \
            before["server"]["generations"].get("cancelled", 0):
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)
    after = health(server)
    generated = after["server"]["completion_tokens"] - before["server"]["completion_tokens"]
    assert generated < 300, generated  # stopped soon after the client left, not at 3000
    assert after["cache"]["cached_items"] == before["cache"]["cached_items"]
    assert after["queue_depth"] == 0


def test_a_plain_request_abandoned_by_its_client_is_cancelled_too(server):
    before = health(server)["server"]["generations"].get("cancelled", 0)
    body = {"model": MODEL, "max_tokens": 3000,
            "messages": [{"role": "user", "content": "Write a very long poem"}]}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/chat/completions", body, timeout=0.3)
    deadline = time.monotonic() + 20
    while health(server)["server"]["generations"].get("cancelled", 0) == before:
        assert time.monotonic() < deadline, "the generation was not cancelled"
        time.sleep(0.05)


# -- auth and bad input -------------------------------------------------------------------


def test_api_key_is_required_except_for_health(server):
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()
    with pytest.raises(anthropic.AuthenticationError) as info:
        anthropic.Anthropic(base_url=server, api_key="wrong", max_retries=0).messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}])
    assert info.value.body["type"] == "error"
    assert info.value.body["error"]["type"] == "authentication_error"
    missing = post(server, "/v1/chat/completions", {}, key=None)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(f"{server}/health").status_code == 200


def openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def anthropic_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["message"]
    return body["error"]


def test_bad_input_gets_4xx_in_each_apis_shape(server):
    chat_path, messages_path = "/v1/chat/completions", "/v1/messages"
    good = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    raw = httpx.post(f"{server}{chat_path}", content=b'{"messages": [', headers=auth)
    assert openai_error(raw, 400)["code"] == "invalid_json"
    raw = httpx.post(f"{server}{messages_path}", content=b"not json", headers=auth)
    assert anthropic_error(raw, 400)["type"] == "invalid_request_error"
    assert openai_error(post(server, chat_path, {"model": MODEL}), 400)["param"] == "messages"
    assert openai_error(post(server, chat_path, {**good, "messages": "hi"}), 400)
    assert openai_error(post(server, chat_path, {**good, "max_tokens": "lots"}), 400)
    assert openai_error(post(server, chat_path, {**good, "max_tokens": -5}), 400)["param"] == \
        "max_tokens"
    assert openai_error(post(server, chat_path, {**good, "max_tokens": 10**9}), 400)
    assert openai_error(post(server, chat_path, {**good, "temperature": "hot"}), 400)
    assert openai_error(post(server, chat_path, {**good, "messages": []}), 400)
    image = [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]
    assert openai_error(post(server, chat_path,
                             {**good, "messages": [{"role": "user", "content": image}]}), 400)
    unknown = openai_error(post(server, chat_path, {**good, "model": "gpt-9"}), 404)
    assert unknown["code"] == "model_not_found"
    long_prompt = " ".join(["Paris is the capital of France."] * 400)
    for stream in (False, True):
        too_long = post(server, chat_path, {**good, "stream": stream,
                                            "messages": [{"role": "user", "content": long_prompt}]})
        assert openai_error(too_long, 400)["code"] == "context_length_exceeded"
    big = {**good, "messages": [{"role": "user", "content": "x" * (5 << 20)}]}
    assert openai_error(post(server, chat_path, big), 413)
    assert anthropic_error(post(server, messages_path, big), 413)["type"] == "request_too_large"
    assert openai_error(post(server, "/v1/completions", {"prompt": ["a", "b"]}), 400)
    ant_good = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    assert anthropic_error(post(server, messages_path, {**ant_good, "model": "llama-9000"}), 404)[
        "type"] == "not_found_error"
    assert anthropic_error(post(server, messages_path, {**ant_good, "max_tokens": 0}), 400)
    no_max = {k: v for k, v in ant_good.items() if k != "max_tokens"}
    assert anthropic_error(post(server, messages_path, no_max), 400)
    doc = [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}]
    assert anthropic_error(post(server, messages_path, {
        **ant_good, "messages": [{"role": "user", "content": doc}]}), 400)
    assert anthropic_error(post(server, messages_path, {
        **ant_good, "messages": [{"role": "user", "content": " ".join([long_prompt] * 2)}]}), 400)
    assert openai_error(httpx.get(f"{server}/v1/nothing-here"), 404)
    # ... and the server is still serving, with nothing logged as a crash (checked at exit)
    assert post(server, chat_path, good).status_code == 200
    assert health(server)["status"] == "healthy"


def test_health_and_metrics(server, oai):
    for _ in range(2):  # a hit of its own: the module also runs alone (no test_server_api's)
        chat(oai, "Count the hits.", temperature=0)
    body = health(server)
    assert body["status"] == "healthy" and body["model"] == MODEL and body["model_loaded"]
    cache = body["cache"]
    for field in ("hits", "misses", "total_requests", "cached_items", "size_bytes"):
        assert isinstance(cache[field], int)
    assert cache["hit_rate"].endswith("%") and cache["hits"] > 0, body
    assert body["tokens_per_second"] > 0 and body["queue_depth"] == 0
    metrics = httpx.get(f"{server}/metrics", headers={"Authorization": f"Bearer {KEY}"})
    assert metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    for name in ("mlxc_requests_total{", "mlxc_cache_total{result=\"hit\"}",
                 "mlxc_request_duration_seconds_bucket{", "mlxc_generated_tokens_total ",
                 "mlxc_cache_items ", "mlxc_queue_depth "):
        assert name in text, name
    assert metrics.headers["x-mlxc-cache"] == "bypass"


def test_server_log_has_a_line_per_request_and_no_traceback(server):
    log = server_log()
    assert "mlxc serve" in log and "cache size" in log  # the start-up panel
    assert "POST /v1/chat/completions 200 hit" in log and " ms" in log
    assert "POST /v1/messages 401" in log
    assert "Traceback" not in log, log

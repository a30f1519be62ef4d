"""Hardening, round 3 (issue 30), against a real `mlxc serve` on the tiny model, driven by
the official openai and anthropic clients (raw HTTP only where a client cannot send what is
under test: a lone surrogate, a body cut off mid-way):

- a lone UTF-16 surrogate is a 400 on every route, /v1/messages/count_tokens included;
- a client that hangs up mid-body is a 499 line, not a 500 with a traceback;
- requests refused with 503 (queue full) are counted as refused, not as cache misses;
- /v1/completions defaults max_tokens to OpenAI's 16, filled in before keying;
- unknown routes and methods answer in the API's error shape (404/405 kept), HEAD / is 200.
"""

from __future__ import annotations

import re
import socket
import time

import anthropic
import httpx
import openai
import pytest
from live_server import mlxc_server

MODEL = "tiny-llama"
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model):
    """(url, log path) of a keyless server that runs one sequence and queues none: a long
    stream fills it, so the next request is refused at once."""
    root = tmp_path_factory.mktemp("round3")
    with mlxc_server(root, tiny_model, "--max-batch", "1", "--max-queue", "0") as running:
        url, _, log = running
        yield url, log


@pytest.fixture(scope="module")
def oai(served):
    return openai.OpenAI(base_url=f"{served[0]}/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def ant(served):
    return anthropic.Anthropic(base_url=served[0], api_key="none", max_retries=0, timeout=60)


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=10).json()


def metric(url: str, line_start: str) -> float | None:
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


def wait_for(condition, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# -- 4. lone surrogates, bodies cut off ------------------------------------------------------

# What a JavaScript client sends for a string cut in the middle of an emoji. The official
# Python clients cannot send it (they encode to UTF-8 first), so it goes as raw bytes.
LONE = "hi \\ud83d there"
BODIES = {
    "/v1/messages/count_tokens": '{"model": "%s", "messages": [{"role": "user", "content": "%s"}]}',
    "/v1/messages": '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", '
    '"content": "%s"}]}',
    "/v1/chat/completions": '{"model": "%s", "max_tokens": 2, "messages": [{"role": "user", '
    '"content": "%s"}]}',
    "/v1/completions": '{"model": "%s", "max_tokens": 2, "prompt": "%s"}',
    "/v1/responses": '{"model": "%s", "max_output_tokens": 2, "input": "%s"}',
}


def test_a_lone_surrogate_is_a_400_in_each_apis_shape(served):
    url, log = served
    for path, template in BODIES.items():
        body = (template % (MODEL, LONE)).encode()
        r = httpx.post(f"{url}{path}", content=body, headers=JSON, timeout=60)
        assert r.status_code == 400, (path, r.text)
        reply = r.json()
        if path.startswith("/v1/messages"):
            assert reply["type"] == "error", reply
            assert reply["error"]["type"] == "invalid_request_error"
            assert "surrogate" in reply["error"]["message"]
        else:
            assert set(reply["error"]) == {"message", "type", "param", "code"}, reply
            assert reply["error"]["type"] == "invalid_request_error"
            assert "surrogate" in reply["error"]["message"] and reply["error"]["param"]
    assert "Traceback" not in log.read_text()


def test_a_surrogate_pair_is_text_and_counted_like_the_client_counts_it(served, ant):
    url, _ = served
    body = BODIES["/v1/messages/count_tokens"] % (MODEL, "hi \\ud83d\\ude00 there")
    raw = httpx.post(f"{url}/v1/messages/count_tokens", content=body.encode(), headers=JSON)
    assert raw.status_code == 200, raw.text
    counted = ant.messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "hi \U0001f600 there"}]
    )
    assert raw.json()["input_tokens"] == counted.input_tokens > 0


def _hang_up_mid_body(url: str, path: str) -> None:
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f'Content-Length: 500\r\n\r\n{{"model": "{MODEL}", "messages": ['.encode()
        )
        time.sleep(0.3)  # the server is reading the body when the client leaves


def log_text(log) -> str:
    return " ".join(log.read_text().split())  # Rich wraps long lines at the console width


def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_500(served):
    url, log = served
    for path in ("/v1/messages/count_tokens", "/v1/chat/completions"):
        _hang_up_mid_body(url, path)
    gone = re.compile(r"POST (\S+) (\w+) - \d+ ms \(the client disconnected before sending")
    wait_for(lambda: len(gone.findall(log_text(log))) >= 2)
    text = log_text(log)
    assert "Traceback" not in text and "ClientDisconnect" not in text, text
    assert sorted(gone.findall(text)) == [
        ("/v1/chat/completions", "499"),
        ("/v1/messages/count_tokens", "499"),
    ]
    for path in ("/v1/messages/count_tokens", "/v1/chat/completions"):
        labels = f'mlxc_requests_total{{route="{path}",status="%s",cache="-"}}'
        assert metric(url, labels % "499") == 1
        assert metric(url, labels % "500") is None


# -- 5. refusals are not misses ------------------------------------------------------------


def test_requests_refused_when_full_are_counted_as_refused_not_misses(served, oai, ant):
    url, _ = served
    holder = oai.chat.completions.create(  # a long stream takes the only place
        model=MODEL,
        max_tokens=3000,
        stream=True,
        messages=[{"role": "user", "content": "hold the only place"}],
    )
    next(iter(holder))
    before = health(url)
    assert before["batch"]["running"] == 1
    for i in range(4):  # distinct requests, each cacheable, each refused
        with pytest.raises(openai.APIStatusError) as refused:
            oai.chat.completions.create(
                model=MODEL, max_tokens=4, messages=[{"role": "user", "content": f"no room {i}"}]
            )
        assert refused.value.status_code == 503
    with pytest.raises(anthropic.APIStatusError) as refused:
        ant.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "no room either"}]
        )
    assert refused.value.status_code == 503
    after = health(url)
    assert after["cache"]["misses"] == before["cache"]["misses"], after["cache"]
    assert after["server"]["refused"] == before["server"]["refused"] + 5
    assert "refused" not in after["server"]["replies"]  # not an outcome of the cache
    assert metric(url, "mlxc_refused_total") == after["server"]["refused"]
    holder.close()  # the place is free again: the next request is a miss, counted
    wait_for(lambda: health(url)["batch"]["running"] == 0)
    oai.chat.completions.create(
        model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "no room 0"}]
    )
    assert health(url)["cache"]["misses"] == before["cache"]["misses"] + 1


# -- 10. completions' max_tokens ----------------------------------------------------------


def test_completions_default_to_16_tokens_and_share_the_key_of_16(oai):
    prompt = "The quick brown fox jumps over"
    raw = oai.completions.with_raw_response.create(model=MODEL, prompt=prompt)
    assert raw.headers["x-mlxc-cache"] == "miss"
    done = raw.parse()
    assert done.usage.completion_tokens == 16 and done.choices[0].finish_reason == "length"
    again = oai.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=16)
    assert again.headers["x-mlxc-cache"] == "hit"  # the default was keyed as 16
    assert again.parse().choices[0].text == done.choices[0].text
    longer = oai.completions.with_raw_response.create(model=MODEL, prompt=prompt, max_tokens=17)
    assert longer.headers["x-mlxc-cache"] == "miss"
    chat = oai.chat.completions.create(  # chat keeps the model's limit, not 16
        model=MODEL,
        messages=[{"role": "user", "content": "The quick brown fox"}],
    )
    assert chat.usage.completion_tokens > 16 or chat.choices[0].finish_reason == "stop"


# -- 11. unknown routes and methods ------------------------------------------------------


def test_unknown_routes_answer_in_openais_shape(oai):
    with pytest.raises(openai.NotFoundError) as missing:
        oai.post("/chat/completion", cast_to=object, body={"model": MODEL})
    error = missing.value.body
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["type"] == "invalid_request_error"
    assert error["message"] == "Invalid URL (POST /v1/chat/completion)"
    with pytest.raises(openai.APIStatusError) as wrong:
        oai.get("/chat/completions", cast_to=object)
    assert wrong.value.status_code == 405
    assert wrong.value.response.headers["allow"] == "POST"
    assert wrong.value.body["message"] == "Invalid method for URL (GET /v1/chat/completions)"
    assert set(wrong.value.body) == {"message", "type", "param", "code"}


def test_unknown_routes_answer_anthropic_clients_in_their_shape(ant):
    with pytest.raises(anthropic.NotFoundError) as missing:
        ant.post("/v1/mesages", cast_to=object, body={"model": MODEL})
    body = missing.value.body
    assert body["type"] == "error" and body["error"]["type"] == "not_found_error", body
    assert body["error"]["message"] == "Invalid URL (POST /v1/mesages)"
    with pytest.raises(anthropic.APIStatusError) as wrong:
        ant.get("/v1/messages", cast_to=object)
    assert wrong.value.status_code == 405
    assert wrong.value.response.headers["allow"] == "POST"
    assert wrong.value.body["type"] == "error"
    assert wrong.value.body["error"]["type"] == "invalid_request_error"


def test_head_and_get_of_the_root_answer_200(served):
    url, log = served
    head = httpx.head(f"{url}/", timeout=10)  # what Claude Code probes before it starts
    assert head.status_code == 200 and head.content == b""
    root = httpx.get(f"{url}/", timeout=10)
    assert root.status_code == 200 and root.json()["name"] == "mlxc"
    assert "HEAD / 200" in log_text(log)

"""Malformed values that once gave 5xx: each is now a 4xx in the route's own error shape,
the server log has a line for it, and nothing is silently ignored."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from live_server import mlxc_server

MODEL = "tiny-llama"
USER = [{"role": "user", "content": "hi"}]
CHAT = {"model": MODEL, "max_tokens": 2, "messages": USER}
ANT = {"model": MODEL, "max_tokens": 2, "messages": USER}
CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}


@pytest.fixture(scope="module")
def plain(tmp_path_factory, tiny_model):
    with mlxc_server(tmp_path_factory.mktemp("input"), tiny_model) as (url, _, log):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, log


def deep(n: int, where: str = "chat") -> bytes:
    """A body with a value nested n arrays deep (json.dumps itself cannot write one)."""
    value = "[" * n + '"x"' + "]" * n
    if where == "chat":
        return json.dumps(CHAT)[:-1].encode() + b', "user": ' + value.encode() + b"}"
    return json.dumps(ANT)[:-1].encode() + b', "metadata": ' + value.encode() + b"}"


def tool_turns(call: object = CALL, result: object = "42") -> list:
    return [*USER, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": result}]


def ant_result(content: object) -> list:
    return [*USER,
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "f",
                                               "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1",
                                          "content": content}]}]


PROBES = {
    "seed -1": ("/v1/chat/completions", {**CHAT, "seed": -1}),
    "seed 2**64": ("/v1/chat/completions", {**CHAT, "seed": 2**64}),
    "seed 10**30 completions": ("/v1/completions", {"model": MODEL, "prompt": "a",
                                                    "max_tokens": 2, "seed": 10**30}),
    "seed float": ("/v1/chat/completions", {**CHAT, "seed": 1.5}),
    "nested 5000 chat": ("/v1/chat/completions", deep(5000)),
    "nested 100 chat": ("/v1/chat/completions", deep(100)),
    "nested 5000 messages": ("/v1/messages", deep(5000, "messages")),
    "tool call not an object": ("/v1/chat/completions",
                                {**CHAT, "messages": tool_turns(call="f()")}),
    "tool call arguments a number": ("/v1/chat/completions", {**CHAT, "messages": tool_turns(
        call={**CALL, "function": {"name": "f", "arguments": 5}})}),
    "tool call arguments a list": ("/v1/chat/completions", {**CHAT, "messages": tool_turns(
        call={**CALL, "function": {"name": "f", "arguments": [1]}})}),
    "tool call function a string": ("/v1/chat/completions", {**CHAT, "messages": tool_turns(
        call={**CALL, "function": "f"})}),
    "tool call name a number": ("/v1/chat/completions", {**CHAT, "messages": tool_turns(
        call={**CALL, "function": {"name": 7, "arguments": "{}"}})}),
    "tool result a number": ("/v1/chat/completions", {**CHAT, "messages": tool_turns(result=5)}),
    "tool result parts of ints": ("/v1/chat/completions",
                                  {**CHAT, "messages": tool_turns(result=[1, 2])}),
    "content parts not objects": ("/v1/chat/completions",
                                  {**CHAT, "messages": [{"role": "user", "content": [1]}]}),
    "tools not objects": ("/v1/chat/completions", {**CHAT, "tools": ["f"]}),
    "tool without function": ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}),
    "ant tool_result a number": ("/v1/messages", {**ANT, "messages": ant_result(5)}),
    "ant tool_result list of ints": ("/v1/messages", {**ANT, "messages": ant_result([1, 2])}),
    "ant tool_result list of strings": ("/v1/messages", {**ANT, "messages": ant_result(["a"])}),
    "ant tool_result an object": ("/v1/messages", {**ANT, "messages": ant_result({"a": 1})}),
    "ant blocks not objects": ("/v1/messages", {**ANT, "messages": [
        {"role": "user", "content": ["hi", 3]}]}),
    "ant tool_use input a string": ("/v1/messages", {**ANT, "messages": [
        *USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                                  "input": "x"}]}]}),
    "ant tool_use name a list": ("/v1/messages", {**ANT, "messages": [
        *USER, {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": [1],
                                                  "input": {}}]}]}),
    "ant text block text a number": ("/v1/messages", {**ANT, "messages": [
        {"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    "ant count_tokens bad result": ("/v1/messages/count_tokens",
                                    {"model": MODEL, "messages": ant_result([1])}),
    "max_completion_tokens 0": ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 0}),
    "max_completion_tokens -1": ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}),
    "max_tokens huge": ("/v1/messages", {**ANT, "max_tokens": 2**70}),
    "temperature NaN": ("/v1/chat/completions",
                        json.dumps(CHAT)[:-1].encode() + b', "temperature": NaN}'),
    "stop of numbers": ("/v1/chat/completions", {**CHAT, "stop": [1, 2]}),
    "prompt token ids out of range": ("/v1/completions",
                                      {"model": MODEL, "prompt": [10**9], "max_tokens": 2}),
    "prompt negative token id": ("/v1/completions",
                                 {"model": MODEL, "prompt": [-1], "max_tokens": 2}),
}


@pytest.mark.parametrize("name", list(PROBES))
def test_malformed_values_get_4xx_in_the_routes_shape(plain, name):
    client, log = plain
    path, body = PROBES[name]
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = client.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert 400 <= response.status_code < 500, f"{name}: {response.status_code} {response.text}"
    error = response.json()
    if path.startswith("/v1/messages"):
        assert error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    else:
        assert error["error"]["type"] == "invalid_request_error" and error["error"]["message"]
    line = f"{path} {response.status_code}"  # a log line for each (written just after)
    deadline = time.monotonic() + 10
    while line not in log.read_text():
        assert time.monotonic() < deadline, f"no log line {line!r}"
        time.sleep(0.05)


def test_max_completion_tokens_zero_is_not_ignored(plain):
    client, _ = plain
    response = client.post("/v1/chat/completions", json={**CHAT, "max_completion_tokens": 0})
    assert response.status_code == 400 and "max_tokens" in response.text


def test_seeds_in_range_are_honoured(plain):
    client, _ = plain
    for seed in (0, 2**63, 2**64 - 1):
        body = {**CHAT, "seed": seed, "temperature": 0.8}
        first = client.post("/v1/chat/completions", json=body)
        assert first.status_code == 200, first.text

"""Anthropic's routes as Claude Code and the anthropic SDK call them: count_tokens, models in
Anthropic's shape, usage in the stream, stop sequences, system messages, refusals. Uses the
session's server from test_server_api.py, driven by the real anthropic client."""

# ruff: noqa: F811  (fixtures imported from test_server_api, passed back as arguments)

from __future__ import annotations

import time

import anthropic
import httpx
import pytest
from test_server_api import KEY, MODEL, ant, oai, post, server  # noqa: F401
from test_server_robustness import engine_busy

TOOLS = [{"name": "get_weather", "description": "Weather in a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}}}]


def test_count_tokens_equals_the_prompt_of_a_generation(ant):
    kwargs = {"model": MODEL, "system": "You count.", "tools": TOOLS,
              "messages": [{"role": "user", "content": "How many tokens is this?"}]}
    counted = ant.messages.count_tokens(**kwargs).input_tokens
    message = ant.messages.create(max_tokens=4, **kwargs)
    usage = message.usage
    assert counted == usage.input_tokens + usage.cache_read_input_tokens > 0
    # (The tiny model's template prints no tools; the count goes through the same template.)


def test_count_tokens_does_not_wait_for_a_generation(server, ant):
    with engine_busy(server):
        started = time.monotonic()
        counted = ant.messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "Quick count"}]).input_tokens
        assert time.monotonic() - started < 5 and counted > 0


def test_count_tokens_refuses_what_messages_refuses(ant):
    with pytest.raises(anthropic.NotFoundError):
        ant.messages.count_tokens(model="no-such-model",
                                  messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError) as caught:
        ant.messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                  extra_body={"mcp_servers": [{"name": "x"}]})
    assert caught.value.body["error"]["type"] == "invalid_request_error"


def test_models_in_anthropic_shape_for_anthropic_clients(ant, oai):
    models = ant.models.list()
    assert [m.id for m in models.data] == [MODEL, "gpt-4o-mini"]
    first = models.data[0]
    assert first.type == "model" and first.display_name == MODEL and first.created_at.year > 2000
    assert ant.models.retrieve(MODEL).id == MODEL
    with pytest.raises(anthropic.NotFoundError) as caught:
        ant.models.retrieve("no-such-model")
    assert caught.value.body["type"] == "error"  # Anthropic's error shape
    assert oai.models.list().data[0].object == "model"  # and OpenAI's for OpenAI clients


def test_stream_usage_on_a_miss_and_cumulative_delta(ant):
    question = [{"role": "user", "content": f"Usage please {time.time()}"}]
    with ant.messages.stream(model=MODEL, max_tokens=6, messages=question) as stream:
        events = list(stream)
    start = events[0].message.usage
    counted = ant.messages.count_tokens(model=MODEL, messages=question).input_tokens
    assert start.input_tokens + start.cache_read_input_tokens == counted
    delta = next(e for e in events if e.type == "message_delta").usage
    assert delta.input_tokens + delta.cache_read_input_tokens == counted
    assert delta.output_tokens > 0


def test_stop_sequence_is_reported(ant):
    question = [{"role": "user", "content": "Say something long"}]
    free = ant.messages.create(model=MODEL, max_tokens=12, messages=question)
    text = free.content[0].text
    stop = text.strip()[:1] or text[1:2]
    assert stop, repr(text)
    stopped = ant.messages.create(model=MODEL, max_tokens=12, messages=question,
                                  stop_sequences=[stop])
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == stop
    assert stop not in stopped.content[0].text
    with ant.messages.stream(model=MODEL, max_tokens=12, messages=question,
                             stop_sequences=[stop]) as stream:  # a hit, replayed
        final = stream.get_final_message()
    assert final.stop_reason == "stop_sequence" and final.stop_sequence == stop


def test_system_messages_inside_messages_join_the_system_prompt(server, ant):
    system = ant.messages.with_raw_response.create(
        model=MODEL, max_tokens=6, system="Be kind.",
        messages=[{"role": "user", "content": "Hello there"}])
    assert system.headers["x-mlxc-cache"] == "miss"
    inline = post(server, "/v1/messages", {
        "model": MODEL, "max_tokens": 6,
        "messages": [{"role": "system", "content": "Be kind."},
                     {"role": "user", "content": "Hello there"}]},
        headers={"anthropic-version": "2023-06-01"})
    assert inline.status_code == 200 and inline.headers["x-mlxc-cache"] == "hit"


def test_unsupported_fields_are_refused_in_anthropic_shape(server):
    body = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    for extra in ({"frobnicate": 1}, {"mcp_servers": [{"name": "x"}]},
                  {"context_management": {"edits": [{"type": "clear_tool_uses_20250919"}]}}):
        refused = post(server, "/v1/messages", {**body, **extra})
        assert refused.status_code == 400, extra
        assert refused.json()["type"] == "error"
        assert refused.json()["error"]["type"] == "invalid_request_error"
    # What Claude Code sends and what changes nothing here is accepted.
    accepted = post(server, "/v1/messages", {
        **body, "metadata": {"user_id": "u"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "system": [{"type": "text", "text": "Hi", "cache_control": {"type": "ephemeral"}}]})
    assert accepted.status_code == 200, accepted.text


def test_models_route_picks_the_shape_by_header(server):
    plain = httpx.get(f"{server}/v1/models", headers={"Authorization": f"Bearer {KEY}"})
    assert plain.json()["object"] == "list"
    ant_shaped = httpx.get(f"{server}/v1/models",
                           headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert ant_shaped.json()["data"][0]["type"] == "model"
    assert ant_shaped.json()["has_more"] is False

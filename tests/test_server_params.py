"""Honour or refuse: parameters this server cannot honour are 400s in the API's own shape,
never silently ignored; those that change nothing are accepted. Real openai client, the
session's server from test_server_api.py."""

# ruff: noqa: F811  (fixtures imported from test_server_api, passed back as arguments)

from __future__ import annotations

import openai
import pytest
from test_server_api import KEY, MODEL, env, oai, post, server  # noqa: F401

HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("extra", [
    {"n": 2}, {"logit_bias": {"1": 5}}, {"frobnicate": True},
    {"functions": [{"name": "f"}]}, {"modalities": ["text", "audio"]}, {"verbosity": "high"},
])
def test_chat_refuses_what_it_cannot_honour(oai, extra):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=4, extra_body=extra)
    error = caught.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == next(iter(extra))


@pytest.mark.parametrize("extra", [{"n": 3}, {"best_of": 2}, {"suffix": "end"}])
def test_completions_refuse_what_they_cannot_honour(oai, extra):
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model=MODEL, prompt="The quick", max_tokens=4, extra_body=extra)


def test_fields_that_change_nothing_are_accepted(oai):
    done = oai.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=4, n=1, user="me", metadata={"k": "v"},
        store=False, service_tier="auto", reasoning_effort="low", parallel_tool_calls=False,
        prompt_cache_key="conversation-1", safety_identifier="someone")
    assert done.choices[0].finish_reason in ("stop", "length")


def test_stream_options_include_usage_is_kept(oai):
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=HI, max_tokens=4, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[-1].usage.total_tokens > 0 and all(c.usage is None for c in chunks[:-1])


def test_errors_in_openai_shape_on_openai_routes(server):
    refused = post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "n": 2})
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "n"


def test_one_tool_call_at_most_when_parallel_calls_are_off(server, oai, env, tiny_model):
    """parallel_tool_calls=false (OpenAI) and disable_parallel_tool_use (Anthropic) are
    honoured: of a stored answer with two calls, one comes back."""
    import anthropic
    from test_server_responses import _store_answer

    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather",
                                             "parameters": {"type": "object", "properties": {}}}}
    calls = [{"id": f"call_{i}", "type": "function",
              "function": {"name": "get_weather", "arguments": "{}"}} for i in range(2)]
    question = [{"role": "user", "content": "Weather twice?"}]
    _store_answer(env, tiny_model, question, [tool], calls, 20)
    both = oai.chat.completions.create(model=MODEL, messages=question, max_tokens=20,
                                       tools=[tool])
    assert len(both.choices[0].message.tool_calls) == 2
    one = oai.chat.completions.create(model=MODEL, messages=question, max_tokens=20,
                                      tools=[tool], parallel_tool_calls=False)
    assert len(one.choices[0].message.tool_calls) == 1

    choice = {"type": "auto", "disable_parallel_tool_use": True}
    _store_answer(env, tiny_model, question, [tool], calls, 20, tool_choice=choice)
    ant = anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0)
    message = ant.messages.create(
        model=MODEL, messages=question, max_tokens=20, tool_choice=choice,
        tools=[{"name": "get_weather", "description": "Weather",
                "input_schema": {"type": "object", "properties": {}}}])
    assert [b.type for b in message.content] == ["tool_use"]

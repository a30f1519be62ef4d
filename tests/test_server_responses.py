"""The OpenAI Responses API as Codex CLI and the Agents SDK call it, through the real openai
client: create and stream, instructions, previous_response_id, function tools and their
outputs, the caches it shares with chat, refusals. Uses the session's server from
test_server_api.py."""

# ruff: noqa: F811  (fixtures imported from test_server_api, passed back as arguments)

from __future__ import annotations

import json

import httpx
import openai
import pytest
from test_server_api import KEY, MODEL, env, oai, post, server  # noqa: F401

TOOL = {"type": "function", "name": "get_weather", "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def create(oai, **kwargs):
    raw = oai.responses.with_raw_response.create(model=MODEL, **kwargs)
    return raw.headers["x-mlxc-cache"], raw.parse()


def test_create_shares_the_cache_with_the_equivalent_chat_request(oai):
    chat = oai.chat.completions.create(
        model=MODEL, max_tokens=6, messages=[{"role": "system", "content": "Be terse."},
                                             {"role": "user", "content": "Name a colour"}])
    status, response = create(oai, instructions="Be terse.", input="Name a colour",
                              max_output_tokens=6)
    assert status == "hit"
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.output_tokens == chat.usage.completion_tokens
    assert response.usage.input_tokens_details.cached_tokens == response.usage.input_tokens
    if chat.choices[0].finish_reason == "length":
        assert response.status == "incomplete"
        assert response.incomplete_details.reason == "max_output_tokens"
    # Items instead of a string: the same request.
    status, again = create(oai, max_output_tokens=6, input=[
        {"role": "developer", "content": "Be terse."},
        {"type": "message", "role": "user",
         "content": [{"type": "input_text", "text": "Name a colour"}]}])
    assert status == "hit" and again.output_text == response.output_text


def test_stream_events_in_the_official_order(oai):
    events = list(oai.responses.create(model=MODEL, input="Stream a fruit", stream=True,
                                       max_output_tokens=6))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done",
                            "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert events[-1].response.output_text == text
    assert len({e.item_id for e in events if hasattr(e, "item_id")}) == 1
    status, plain = create(oai, input="Stream a fruit", max_output_tokens=6)
    assert status == "hit" and plain.output_text == text


def test_previous_response_id_continues_the_conversation(oai):
    _, first = create(oai, instructions="Be kind.", input="Hello there", max_output_tokens=4)
    _, second = create(oai, previous_response_id=first.id, input="And then?",
                       max_output_tokens=4)
    assert second.previous_response_id == first.id
    # The same conversation as chat messages (instructions are not carried over): a hit.
    raw = oai.chat.completions.with_raw_response.create(model=MODEL, max_tokens=4, messages=[
        {"role": "user", "content": "Hello there"},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}])
    assert raw.headers["x-mlxc-cache"] == "hit"
    assert raw.parse().choices[0].message.content == second.output_text
    assert oai.responses.retrieve(first.id).output_text == first.output_text
    with pytest.raises(openai.BadRequestError) as caught:
        create(oai, previous_response_id="resp_missing", input="Hi", max_output_tokens=4)
    assert caught.value.body["param"] == "previous_response_id"


def test_store_false_keeps_nothing(oai):
    _, response = create(oai, input="Forget me", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError):
        oai.responses.retrieve(response.id)


def _store_answer(env, tiny_model, messages, tools, answer_calls, max_tokens, **fields):
    """Put a tool-calling answer in the response cache (the tiny random model never makes
    one): what the server then replays is the formatting under test."""
    from mlxc.config import load_settings
    from mlxc.model.refs import model_fingerprint, resolve_model
    from mlxc.request import Answer, GenerationRequest, Usage
    from mlxc.store import open_store

    settings = load_settings().with_overrides(cache_dir=env["MLXC_CACHE_DIR"],
                                              models_dir=env["MLXC_MODELS_DIR"])
    request = GenerationRequest(messages=messages, max_tokens=max_tokens, tools=tools, **fields)
    answer = Answer(text="", finish_reason="tool_calls", tool_calls=answer_calls,
                    usage=Usage(prompt_tokens=20, completion_tokens=9), model=MODEL)
    store = open_store(settings)
    fingerprint = model_fingerprint(resolve_model(str(tiny_model), settings), settings)
    store.set(request.cache_key(fingerprint), answer.model_dump(mode="json"))
    store.close()


def test_function_tools_round_trip(oai, env, tiny_model):
    question = [{"role": "user", "content": "Weather in Oslo?"}]
    chat_tool = {"type": "function", "function": {k: TOOL[k] for k in
                                                  ("name", "description", "parameters")}}
    call = {"id": "call_oslo", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    _store_answer(env, tiny_model, question, [chat_tool], [call], 20)

    _, response = create(oai, input="Weather in Oslo?", tools=[TOOL], max_output_tokens=20)
    assert response.status == "completed"
    (item,) = response.output
    assert item.type == "function_call" and item.name == "get_weather"
    assert item.call_id == "call_oslo" and json.loads(item.arguments) == {"city": "Oslo"}

    with oai.responses.stream(model=MODEL, input="Weather in Oslo?", tools=[TOOL],
                              max_output_tokens=20) as stream:
        kinds = [e.type for e in stream]
        final = stream.get_final_response()
    assert "response.function_call_arguments.delta" in kinds
    assert final.output[0].call_id == "call_oslo"

    # The tool's output, by previous_response_id or by sending the whole history (as Codex
    # does with store=false): one conversation, so the second is a hit.
    _, after = create(oai, previous_response_id=response.id, tools=[TOOL],
                      max_output_tokens=4,
                      input=[{"type": "function_call_output", "call_id": "call_oslo",
                              "output": "sunny"}])
    status, replayed = create(oai, tools=[TOOL], max_output_tokens=4, store=False, input=[
        {"role": "user", "content": "Weather in Oslo?"},
        {"type": "function_call", "call_id": "call_oslo", "name": "get_weather",
         "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_oslo", "output": "sunny"}])
    assert status == "hit" and replayed.output_text == after.output_text


@pytest.mark.parametrize("extra", [
    {"tools": [{"type": "web_search"}]}, {"truncation": "auto"}, {"background": True},
    {"frobnicate": 1}, {"top_logprobs": 3},
    {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
])
def test_refusals_are_400s_in_openai_shape(server, extra):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 4, **extra}
    refused = post(server, "/v1/responses", body)
    assert refused.status_code == 400, refused.text
    assert refused.json()["error"]["type"] == "invalid_request_error"


def test_accepted_fields_codex_sends(server):
    body = {"model": MODEL, "input": "hi", "max_output_tokens": 4, "stream": False,
            "reasoning": {"effort": "medium"}, "store": False, "include": [],
            "parallel_tool_calls": False, "tool_choice": "auto", "prompt_cache_key": "s1",
            "text": {"verbosity": "medium"}}
    accepted = post(server, "/v1/responses", body)
    assert accepted.status_code == 200, accepted.text


def test_unknown_response_is_404(server):
    got = httpx.get(f"{server}/v1/responses/resp_nothing",
                    headers={"Authorization": f"Bearer {KEY}"})
    assert got.status_code == 404 and got.json()["error"]["code"] == "not_found"


def test_namespaced_tools_are_offered_and_named_back(server, env, tiny_model):
    """Codex groups tools in a `namespace`; its functions reach the model, and a call to
    one comes back with its namespace."""
    spawn = {"type": "function", "name": "spawn_agent", "description": "Start a helper",
             "parameters": {"type": "object", "properties": {}}}
    chat_tool = {"type": "function", "function": {k: spawn[k] for k in
                                                  ("name", "description", "parameters")}}
    call = {"id": "call_spawn", "type": "function",
            "function": {"name": "spawn_agent", "arguments": "{}"}}
    question = [{"role": "user", "content": "Spawn a helper"}]
    _store_answer(env, tiny_model, question, [chat_tool], [call], 20)
    body = {"model": MODEL, "input": "Spawn a helper", "max_output_tokens": 20, "tools": [
        {"type": "namespace", "name": "multi_agent_v1", "description": "Sub-agents",
         "tools": [spawn]}]}
    done = post(server, "/v1/responses", body).json()
    assert done["output"][0]["name"] == "spawn_agent"
    assert done["output"][0]["namespace"] == "multi_agent_v1"


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"},
                                           "level": {"enum": [1, 2, 3]}},
          "required": ["ok", "level"], "additionalProperties": False}


def test_text_format_and_forced_tool_choice_are_honoured(oai):
    """Responses' flat `text.format` and `tool_choice` reach the grammar as chat's do: even
    the tiny random model answers in the schema, or with a call to the named function."""
    _, shaped = create(oai, input="Give me a status", max_output_tokens=40,
                       text={"format": {"type": "json_schema", "name": "status",
                                        "schema": SCHEMA, "strict": True}})
    value = json.loads(shaped.output_text)
    assert set(value) == {"ok", "level"} and value["level"] in (1, 2, 3)
    tool = {**TOOL, "parameters": {"type": "object", "properties": {"city": {"enum": ["Oslo"]}},
                                   "required": ["city"], "additionalProperties": False}}
    _, forced = create(oai, input="Anything", tools=[tool], max_output_tokens=120,
                       tool_choice={"type": "function", "name": "get_weather"})
    call = next(item for item in forced.output if item.type == "function_call")
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Oslo"}


def test_input_tokens_count_equals_the_prompt_of_a_create(oai):
    kwargs = {"instructions": "Count me.", "input": "How long is this prompt?"}
    counted = oai.responses.input_tokens.count(model=MODEL, **kwargs)
    assert counted.object == "response.input_tokens"
    made = oai.responses.create(model=MODEL, max_output_tokens=4, **kwargs)
    assert counted.input_tokens == made.usage.input_tokens > 0

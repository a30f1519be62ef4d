"""`mlxc serve` end to end: a real server process on a free loopback port, on the tiny model
and its own disk cache, driven by the official openai and anthropic clients (and raw HTTP
where the clients hide what is under test: headers, keep-alives, error bodies).

The server is one per session, shared with test_server_robustness.py; each test asks its own
questions, so cache entries never collide. (The tiny random model answers almost every chat
question with newlines; raw completions of "The quick brown fox" give words.)"""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from conftest import run_mlxc
from live_server import start_server, stop_server

KEY = "test-key-123"
MODEL = "tiny-llama"


# One server for the session, though two files use it: a fixture imported into another test
# module gets a second definition there (and would start a second server), so the process
# is kept here and stopped when the session ends.
_SHARED: dict = {}
SERVER_ARGS = (
    "--api-key", KEY, "--keepalive", "0.2", "--alias", "gpt-4o-mini", "--alias", "claude-*",
    # one sequence at a time: a long generation makes the others wait in the queue
    # (keep-alives, single flight); batching is tested in test_server_admission.py
    "--max-batch", "1",
)


def _start_server(tmp_path_factory, tiny_model) -> None:
    running = start_server(tmp_path_factory.mktemp("serve"), tiny_model, *SERVER_ARGS)
    _SHARED.update(running=running, env=running.env, log=running.log, url=running.url)


def _stop_server() -> None:
    stop_server(_SHARED["running"], check=False)


@pytest.fixture(scope="session")
def server(request, tmp_path_factory, tiny_model) -> str:
    """The real command line (`python -m mlxc serve`) in its own process."""
    if "url" not in _SHARED:
        request.config.add_cleanup(_stop_server)
        _start_server(tmp_path_factory, tiny_model)
    return _SHARED["url"]


@pytest.fixture(scope="session")
def env(server) -> dict[str, str]:
    """The server's environment: `mlxc ask` run with it shares the server's cache."""
    return _SHARED["env"]


def server_log() -> str:
    return _SHARED["log"].read_text()


@pytest.fixture(scope="session")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="session")
def ant(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def post(server, path, body, headers=None, key=KEY, timeout=120) -> httpx.Response:
    auth = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{server}{path}", json=body, headers={**auth, **(headers or {})},
                      timeout=timeout)


def health(server) -> dict:
    # with the key: without it, a keyed server's /health says only whether it is up
    return httpx.get(f"{server}/health", timeout=10,
                     headers={"Authorization": f"Bearer {KEY}"}).json()


def chat(oai, question, max_tokens=8, **kwargs):
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": question}],
        max_tokens=max_tokens, **kwargs)
    return raw.headers["x-mlxc-cache"], raw.parse()


# -- OpenAI -------------------------------------------------------------------------------


def test_chat_miss_then_hit(oai):
    status, first = chat(oai, "What is MLX?")
    assert status == "miss"
    assert first.object == "chat.completion" and first.model == MODEL
    assert first.choices[0].finish_reason in ("stop", "length")
    assert first.usage.completion_tokens > 0 and first.usage.prompt_tokens > 0
    status, second = chat(oai, "What is MLX?")
    assert status == "hit"
    assert second.choices[0].message.content == first.choices[0].message.content
    assert second.usage.prompt_tokens_details.cached_tokens == first.usage.prompt_tokens


def test_chat_stream_then_streamed_hit(oai):
    def stream():
        with oai.chat.completions.with_streaming_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me about Paris"}],
            max_tokens=16, stream=True, stream_options={"include_usage": True},
        ) as response:
            chunks = list(response.parse())
            return response.headers["x-mlxc-cache"], chunks

    status, chunks = stream()
    assert status == "miss"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    status, replayed = stream()
    assert status == "hit"
    pieces = [c.choices[0].delta.content for c in replayed
              if c.choices and c.choices[0].delta.content]
    assert "".join(pieces) == text
    usage = replayed[-1].usage
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens > 0
    _, plain = chat(oai, "Tell me about Paris", max_tokens=16)
    assert plain.choices[0].message.content == text


def test_completions_plain_then_streamed_hit_in_pieces(oai):
    done = oai.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=12)
    assert done.object == "text_completion" and done.usage.completion_tokens == 12
    assert done.choices[0].finish_reason == "length"
    with oai.completions.with_streaming_response.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=12, stream=True
    ) as response:
        assert response.headers["x-mlxc-cache"] == "hit"
        pieces = [c.choices[0].text for c in response.parse() if c.choices and c.choices[0].text]
    assert "".join(pieces) == done.choices[0].text
    assert len(pieces) > 1  # the stored answer is re-chunked, not sent as one giant chunk
    stopped = oai.completions.with_raw_response.create(
        model=MODEL, prompt="The quick brown fox", max_tokens=12, stop=["fox fox"])
    assert stopped.headers["x-mlxc-cache"] == "miss"  # the stop strings are in the key
    text = stopped.parse().choices[0].text
    assert stopped.parse().choices[0].finish_reason == "stop"
    assert "fox fox" not in text and done.choices[0].text.startswith(text)


def test_models_lists_the_served_model_and_aliases(oai):
    ids = [m.id for m in oai.models.list().data]
    assert ids == [MODEL, "gpt-4o-mini"]
    assert oai.models.retrieve(MODEL).id == MODEL


def test_alias_answers_with_the_same_cache(oai, ant):
    raw = oai.chat.completions.with_raw_response.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "What is MLX?"}],
        max_tokens=8)
    assert raw.headers["x-mlxc-cache"] == "hit" and raw.parse().model == "gpt-4o-mini"
    message = ant.messages.create(model="claude-sonnet-4-5", max_tokens=8,  # a glob alias
                                  messages=[{"role": "user", "content": "What is MLX?"}])
    assert message.model == "claude-sonnet-4-5"


# -- Anthropic ----------------------------------------------------------------------------


def test_messages_plain_and_streamed(ant):
    raw = ant.messages.with_raw_response.create(
        model=MODEL, max_tokens=8, system="You are terse.",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Name a river"}]}])
    message = raw.parse()
    assert raw.headers["x-mlxc-cache"] == "miss"
    assert message.type == "message" and message.role == "assistant"
    assert message.content[0].type == "text" and message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.output_tokens > 0 and message.usage.input_tokens > 0
    events = list(ant.messages.create(
        model=MODEL, max_tokens=8, system="You are terse.", stream=True,
        messages=[{"role": "user", "content": "Name a river"}]))
    kinds = [e.type for e in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert text == message.content[0].text  # a hit: same request in string and block form
    delta = events[-2]
    prompt = message.usage.input_tokens + message.usage.cache_read_input_tokens
    assert delta.usage.cache_read_input_tokens == prompt  # a hit: the whole prompt is cached


def test_anthropic_stream_has_ping_and_named_events(server):
    response = post(server, "/v1/messages", {
        "model": MODEL, "max_tokens": 8, "stream": True,
        "messages": [{"role": "user", "content": "Name a river"}]}, key=None,
        headers={"x-api-key": KEY, "anthropic-version": "2023-06-01"})
    assert response.status_code == 200
    names = [line[7:] for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "ping", "content_block_start"]
    assert names[-1] == "message_stop"


def test_billing_header_block_is_ignored(ant):
    question = [{"role": "user", "content": "What is the capital of France?"}]
    plain = ant.messages.with_raw_response.create(
        model=MODEL, max_tokens=8, system="You are Claude Code.", messages=question)
    assert plain.headers["x-mlxc-cache"] == "miss"
    for build in ("abc", "def"):
        system = [{"type": "text", "text": f"x-anthropic-billing-header: cc_version=2.1.{build};"
                                           " cc_entrypoint=cli; cch=00000;"},
                  {"type": "text", "text": "You are Claude Code.",
                   "cache_control": {"type": "ephemeral"}}]
        again = ant.messages.with_raw_response.create(
            model=MODEL, max_tokens=8, system=system, messages=question)
        assert again.headers["x-mlxc-cache"] == "hit"
        assert again.parse().content[0].text == plain.parse().content[0].text


def test_billing_header_line_is_ignored_on_the_openai_route_too(oai, ant):
    question = [{"role": "user", "content": "Is Paris in France?"}]
    ant.messages.create(model=MODEL, max_tokens=8, system="Be brief.", messages=question)
    billed = "x-anthropic-billing-header: cc_version=2.1.9; cch=12345;\nBe brief."
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL, max_tokens=8, messages=[{"role": "system", "content": billed}, *question])
    assert raw.headers["x-mlxc-cache"] == "hit"  # same canonical request as the one above


# -- one cache for everything -------------------------------------------------------------


def test_ask_and_server_share_the_cache(oai, env):
    asked = run_mlxc("ask", "Why is the sky blue?", "--max-tokens", "8", "--json", env=env)
    assert asked.returncode == 0, asked.stderr
    status, served = chat(oai, "Why is the sky blue?")
    assert status == "hit"
    assert served.choices[0].message.content == json.loads(asked.stdout)["text"]
    status, first = chat(oai, "Why is grass green?")
    assert status == "miss"
    asked = run_mlxc("ask", "Why is grass green?", "--max-tokens", "8", "--json", env=env)
    assert json.loads(asked.stdout)["cached"] is True
    assert json.loads(asked.stdout)["text"] == first.choices[0].message.content


def test_cache_control_no_cache_and_no_store(server):
    body = {"model": MODEL, "max_tokens": 6,
            "messages": [{"role": "user", "content": "Count to three"}]}
    assert post(server, "/v1/chat/completions", body).headers["x-mlxc-cache"] == "miss"
    assert post(server, "/v1/chat/completions", body).headers["x-mlxc-cache"] == "hit"
    fresh = post(server, "/v1/chat/completions", body, headers={"Cache-Control": "no-cache"})
    assert fresh.headers["x-mlxc-cache"] == "miss"
    body["messages"][0]["content"] = "Count to four"
    for _ in range(2):  # never written, so never a hit
        kept_out = post(server, "/v1/chat/completions", body, headers={"Cache-Control": "no-store"})
        assert kept_out.headers["x-mlxc-cache"] == "miss"
    both = post(server, "/v1/chat/completions", body,
                headers={"Cache-Control": "no-cache, no-store"})
    assert both.status_code == 200 and both.headers["x-mlxc-cache"] == "bypass"
    sampled = {**body, "temperature": 0.8}  # not deterministic: not cached by default
    assert post(server, "/v1/chat/completions", sampled).headers["x-mlxc-cache"] == "bypass"


# -- tool calls -----------------------------------------------------------------------

WEATHER_TOOL = {"name": "get_weather", "description": "Weather in a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def test_cached_tool_calls_replay_in_both_apis(server, oai, ant, env, tiny_model):
    """A stored answer with a tool call (the tiny random model never makes one) comes back
    in each API's shape, plain and streamed: the formatting of the hit path."""
    from mlxc.config import load_settings
    from mlxc.model.refs import model_fingerprint, resolve_model
    from mlxc.request import Answer, GenerationRequest, Usage
    from mlxc.store import open_store

    settings = load_settings().with_overrides(cache_dir=env["MLXC_CACHE_DIR"],
                                              models_dir=env["MLXC_MODELS_DIR"])
    question = [{"role": "user", "content": "Weather in Paris?"}]
    request = GenerationRequest(messages=question, max_tokens=20,
                                tools=[{"type": "function", "function": WEATHER_TOOL}])
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    answer = Answer(text="", finish_reason="tool_calls", tool_calls=[call],
                    usage=Usage(prompt_tokens=20, completion_tokens=9), model=MODEL)
    store = open_store(settings)
    store.set(request.cache_key(model_fingerprint(resolve_model(str(tiny_model), settings),
                                                  settings)), answer.model_dump(mode="json"))
    store.close()

    tools = [{"type": "function", "function": WEATHER_TOOL}]
    done = oai.chat.completions.create(model=MODEL, messages=question, max_tokens=20, tools=tools)
    assert done.choices[0].finish_reason == "tool_calls"
    assert done.choices[0].message.tool_calls[0].function.arguments == '{"city": "Paris"}'
    chunks = list(oai.chat.completions.create(model=MODEL, messages=question, max_tokens=20,
                                              tools=tools, stream=True))
    deltas = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
    assert deltas[0][0].function.name == "get_weather" and deltas[0][0].index == 0
    assert chunks[-1].choices[0].finish_reason == "tool_calls"

    ant_tools = [{"name": "get_weather", "description": "Weather in a city",
                  "input_schema": WEATHER_TOOL["parameters"]}]
    message = ant.messages.create(model=MODEL, messages=question, max_tokens=20, tools=ant_tools)
    assert message.stop_reason == "tool_use"
    assert message.content[0].type == "tool_use" and message.content[0].input == {"city": "Paris"}
    with ant.messages.stream(model=MODEL, messages=question, max_tokens=20,
                             tools=ant_tools) as stream:
        final = stream.get_final_message()
    assert final.content[0].input == {"city": "Paris"} and final.stop_reason == "tool_use"

"""Fuzzed bodies for every route of a real `mlxc serve`: whatever a client sends, the answer
is a 2xx or a 4xx in the route's own error shape, never a 5xx, and the server keeps serving.

Bodies are built by Hypothesis from each route's real fields, each field either a plausible
value or any JSON value at all, so that most requests get past the first check. The run is
derandomized (the same examples in CI every time) and bounded: MLXC_FUZZ_EXAMPLES per route
(default 60). A longer, exploring run: MLXC_FUZZ_RANDOM=1 MLXC_FUZZ_EXAMPLES=500."""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_server import mlxc_server

EXAMPLES = int(os.environ.get("MLXC_FUZZ_EXAMPLES", "60"))
RANDOM = os.environ.get("MLXC_FUZZ_RANDOM") == "1"  # explore new examples (not for CI)
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=not RANDOM, database=None,
                suppress_health_check=list(HealthCheck), print_blob=True)

scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
           | st.floats(allow_nan=True, allow_infinity=False) | st.text(max_size=12))
anything = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def either(good):
    return good  # plausible values; `mutated` then breaks a few of them


def optional(**fields):
    return st.fixed_dictionaries({}, optional=fields)


def body(required: dict, **fields):
    return mutated(st.builds(lambda r, o: {**r, **o}, st.fixed_dictionaries(required),
                             optional(**fields)))


def _slots(value, out):
    """Every (container, key) in a JSON value, to mutate in place."""
    items = value.items() if isinstance(value, dict) else enumerate(value) \
        if isinstance(value, list) else ()
    for key, inner in items:
        out.append((value, key))
        _slots(inner, out)
    return out


@st.composite
def mutated(draw, base):
    """A plausible body with 0-2 values replaced by any JSON value, or removed."""
    data = copy.deepcopy(draw(base))  # sampled constants must not change under us
    for _ in range(draw(st.integers(0, 2))):
        slots = _slots(data, [])
        if not slots:
            break
        container, key = draw(st.sampled_from(slots))
        if isinstance(container, dict) and draw(st.booleans()):
            del container[key]
        else:
            container[key] = draw(anything)
    return data


words = st.text(alphabet="abc xyz.?", min_size=1, max_size=16)
small = st.integers(0, 3)
seeds = st.sampled_from([-1, 0, 7, 2**63, 2**64 - 1, 2**64, 10**30])  # some out of range
unit = st.floats(0.01, 1.0, allow_nan=False)
schema = st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
    {"type": "array"}, {"type": "banana"}, {"$ref": "#/nowhere"}, {}, True,
])
function = st.fixed_dictionaries({"name": either(words), "arguments": either(words)})
tool_call = st.fixed_dictionaries({"id": either(words), "type": either(st.just("function")),
                                   "function": either(function)})
part = st.fixed_dictionaries({"type": either(st.sampled_from(["text", "input_text",
                                                               "image_url"])),
                              "text": either(words)})
chat_message = st.fixed_dictionaries(
    {"role": either(st.sampled_from(["system", "developer", "user", "assistant", "tool"])),
     "content": either(words | st.lists(part, max_size=2))},
    optional={"tool_calls": either(st.lists(tool_call, max_size=2)),
              "tool_call_id": either(words), "name": either(words)})
oai_tool = st.fixed_dictionaries({"type": either(st.just("function")), "function": either(
    st.fixed_dictionaries({"name": either(words), "parameters": either(schema)}))})
sampling = dict(temperature=unit, top_p=unit, top_k=small, min_p=unit, seed=seeds,
                presence_penalty=unit, frequency_penalty=unit, repetition_penalty=unit,
                stop=words | st.lists(words, max_size=2), stream=st.booleans(),
                stream_options=st.fixed_dictionaries({"include_usage": st.booleans()}),
                n=st.just(1))
chat_body = body(
    {"model": st.just("tiny-llama"), "messages": st.lists(chat_message, min_size=1, max_size=3),
     "max_tokens": small},
    max_completion_tokens=small, tools=st.lists(oai_tool, max_size=2),
    tool_choice=st.sampled_from(["auto", "none", "required", {"type": "function",
                                                              "function": {"name": "f"}}]),
    response_format=st.sampled_from([{"type": "text"}, {"type": "json_object"}])
    | st.builds(lambda s: {"type": "json_schema", "json_schema": {"name": "x", "schema": s}},
                schema),
    logprobs=st.booleans(), top_logprobs=small, parallel_tool_calls=st.booleans(), **sampling)
completion_body = body(
    {"model": st.just("tiny-llama"), "max_tokens": small,
     "prompt": words | st.lists(words, max_size=2) | st.lists(st.integers(-5, 500), max_size=4)},
    echo=st.booleans(), logprobs=small, best_of=st.just(1), **sampling)
block = st.fixed_dictionaries(
    {"type": either(st.sampled_from(["text", "tool_use", "tool_result", "thinking", "image"]))},
    optional={"text": either(words), "id": either(words), "name": either(words),
              "input": anything, "tool_use_id": either(words),
              "content": either(words | st.lists(st.fixed_dictionaries(
                  {"type": either(st.just("text")), "text": either(words)}), max_size=2))})
ant_message = st.fixed_dictionaries({
    "role": either(st.sampled_from(["user", "assistant", "system"])),
    "content": either(words | st.lists(block, min_size=1, max_size=3))})
ant_tool = st.fixed_dictionaries({"name": either(words), "input_schema": either(schema)},
                                 optional={"description": either(words)})
prompt_fields = dict(
    system=words | st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}),
                            max_size=2),
    tools=st.lists(ant_tool, max_size=2),
    tool_choice=st.sampled_from([{"type": "auto"}, {"type": "any"}, {"type": "none"},
                                 {"type": "tool", "name": "f"}]),
    thinking=st.sampled_from([{"type": "enabled", "budget_tokens": 1024},
                              {"type": "disabled"}]),
    output_config=st.builds(lambda s: {"format": {"type": "json_schema", "schema": s}}, schema),
)
messages_body = body(
    {"model": st.just("tiny-llama"), "max_tokens": small,
     "messages": st.lists(ant_message, min_size=1, max_size=3)},
    stop_sequences=st.lists(words, max_size=2), temperature=unit, top_p=unit, top_k=small,
    stream=st.booleans(), metadata=st.fixed_dictionaries({"user_id": words}), **prompt_fields)
count_body = body({"model": st.just("tiny-llama"),
                   "messages": st.lists(ant_message, min_size=1, max_size=3)}, **prompt_fields)

item = (st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system",
                                                      "developer"]),
                               "content": words | st.lists(st.fixed_dictionaries(
                                   {"type": st.just("input_text"), "text": words}),
                                   max_size=2)})
        | st.fixed_dictionaries({"type": st.just("function_call_output"), "call_id": words,
                                 "output": words}))
text_format = st.sampled_from([{"type": "text"}, {"type": "json_object"}]) | st.builds(
    lambda s: {"type": "json_schema", "name": "x", "schema": s}, schema)
responses_body = body(
    {"model": st.just("tiny-llama"), "max_output_tokens": st.integers(1, 3),
     "input": words | st.lists(item, min_size=1, max_size=3)},
    instructions=words, temperature=unit, top_p=unit, stream=st.booleans(),
    store=st.booleans(), previous_response_id=words, parallel_tool_calls=st.booleans(),
    text=st.fixed_dictionaries({"format": text_format}),
    tools=st.lists(st.fixed_dictionaries({"type": st.just("function"), "name": words,
                                          "parameters": schema}), max_size=2),
    tool_choice=st.sampled_from(["auto", "none", "required",
                                 {"type": "function", "name": "f"}]))

ROUTES = {
    "/v1/responses": responses_body,
    "/v1/chat/completions": chat_body,
    "/v1/completions": completion_body,
    "/v1/messages": messages_body,
    "/v1/messages/count_tokens": count_body,
}


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory, tiny_model):
    with mlxc_server(tmp_path_factory.mktemp("fuzz"), tiny_model) as (url, _, log):
        with httpx.Client(base_url=url, timeout=60) as client:
            yield client, log


def check(response: httpx.Response, anthropic: bool) -> None:
    """A 2xx, or a 4xx in the API's shape; never a 5xx."""
    where = f"{response.request.method} {response.request.url.path} -> {response.status_code}"
    assert response.status_code < 500, f"{where}: {response.text[:500]}\n" \
        f"body: {response.request.content[:2000]!r}"
    if response.status_code >= 400:
        error = response.json()
        if anthropic:
            assert error["type"] == "error" and error["error"]["message"], where
        else:
            assert set(error["error"]) >= {"message", "type", "code"}, where


@pytest.mark.parametrize("path", list(ROUTES))
def test_fuzzed_bodies_get_2xx_or_4xx(fuzzed, path):
    client, _ = fuzzed
    anthropic = path.startswith("/v1/messages")
    seen: Counter[int] = Counter()

    @FUZZ
    @given(ROUTES[path])
    def one(data):
        raw = json.dumps(data).encode()
        headers = {"Content-Type": "application/json", "Cache-Control": "no-store"}
        with client.stream("POST", path, content=raw, headers=headers) as response:
            response.read()
        seen[response.status_code] += 1
        check(response, anthropic)

    one()
    print(f"{path}: statuses {dict(sorted(seen.items()))}")  # how far the bodies got
    assert client.get("/health").status_code == 200


@FUZZ
@given(st.text(max_size=40), st.sampled_from(["/v1/models/", "/v1/", "/", "/health/",
                                                 "/v1/responses/"]))
def test_fuzzed_paths_and_names_never_5xx(fuzzed, name, prefix):
    client, _ = fuzzed
    for method in ("GET", "DELETE"):
        response = client.request(method, prefix + quote(name, safe=""))
        assert response.status_code < 500, response.text

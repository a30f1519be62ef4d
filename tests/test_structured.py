"""Structured outputs and forced tool calls: what cannot be honoured is refused (no model
needed), and through a real `mlxc serve` on the tiny random model with the official openai
and anthropic clients, answers parse and follow the schema — a random model is the hardest
case for a grammar, it would never write JSON by itself."""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from live_server import served  # noqa: F401  (fixture)
from pydantic import BaseModel, Field

from mlxc.engine.decode.constraints import ConstraintError, grammar_for

# Every value is bounded, so even a random model's answer ends well within max_tokens.
SCHEMA = {
    "type": "object",
    "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}, "ok": {"type": "boolean"},
                   "level": {"enum": [1, 2, 3]}},
    "required": ["unit", "ok", "level"],
    "additionalProperties": False,
}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather in a city",
    "parameters": {"type": "object", "properties": {"unit": {"enum": ["c", "f"]},
                                                    "days": {"enum": [1, 2, 3]}},
                   "required": ["unit", "days"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {
        "zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"], "additionalProperties": False}}}


def follows(value: dict, schema: dict) -> bool:
    """Enough of JSON Schema for these: required keys, no others, enums and booleans."""
    props = schema["properties"]
    if set(value) != set(schema["required"]) or not set(value) <= set(props):
        return False
    for key, rule in props.items():
        if "enum" in rule and value[key] not in rule["enum"]:
            return False
        if rule.get("type") == "boolean" and not isinstance(value[key], bool):
            return False
    return True


@pytest.mark.parametrize(("response_format", "tools", "tool_choice", "says"), [
    ({"type": "json_schema", "json_schema": {"schema": {"type": "strnig"}}}, None, None,
     "cannot be used"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, None, None, "needs a 'schema'"),
    ({"type": "yaml"}, None, None, "not supported"),
    (None, None, "required", "no tools"),
    (None, [WEATHER], {"type": "function", "function": {"name": "nope"}}, "not in tools"),
    ({"type": "json_object"}, [WEATHER], "required", "not both"),
    (None, [WEATHER], "sometimes", "not understood"),
])
def test_what_cannot_be_honoured_is_refused(response_format, tools, tool_choice, says):
    with pytest.raises(ConstraintError, match=says):
        grammar_for(response_format, tools, tool_choice)


def test_free_answers_need_no_grammar():
    assert grammar_for(None, [WEATHER], "auto") is None
    assert grammar_for({"type": "text"}, None, {"type": "auto"}) is None


@pytest.fixture(scope="module")
def urls(served):  # noqa: F811
    return served[0]


@pytest.fixture(scope="module")
def client(urls) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{urls}/v1", api_key="none", max_retries=0)


def test_json_schema_answers_parse_and_follow_the_schema(client):
    for question in ("Weather in Paris?", "Weather in Oslo?", "Weather in Rome?"):
        answer = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": question}], max_tokens=80,
            temperature=0, response_format={"type": "json_schema", "json_schema": {
                "name": "weather", "schema": SCHEMA, "strict": True}},
        )
        assert follows(json.loads(answer.choices[0].message.content), SCHEMA)
    sampled = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Any JSON object"}],
        max_tokens=60, temperature=1.0, seed=3, response_format={"type": "json_object"},
    )
    if sampled.choices[0].finish_reason == "stop":  # free strings may run past max_tokens
        assert isinstance(json.loads(sampled.choices[0].message.content), dict)


class Person(BaseModel):
    name: str = Field(min_length=2)  # so that the random model writes (and loops) in it
    age: int


def test_a_value_that_loops_is_closed_so_the_answer_parses(client):
    """A small model stuck in a loop inside a free string or number (the random model here:
    "ityity...", "-1111...") wrote until max_tokens, and the client's parse (LangChain's
    with_structured_output too) raised LengthFinishReasonError; the loop guard
    (engine/decode/loop_guard.py) closes the value and the rest of the schema follows."""
    for question in ("Who is Ada?", "Name and age of Linus"):
        done = client.chat.completions.parse(
            model="default", messages=[{"role": "user", "content": question}], max_tokens=80,
            temperature=0, response_format=Person)
        assert done.choices[0].finish_reason == "stop"
        person = done.choices[0].message.parsed
        assert len(person.name) >= 2 and isinstance(person.age, int)


def test_forced_tool_calls_name_the_tool_and_follow_its_schema(client):
    choices = [({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
               ("required", {"get_weather", "get_time"})]
    for tool_choice, names in choices:
        answer = client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "What now?"}],
            max_tokens=80, temperature=0, tools=[WEATHER, TIME], tool_choice=tool_choice,
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0].function
        assert call.name in names
        schema = (WEATHER if call.name == "get_weather" else TIME)["function"]["parameters"]
        assert follows(json.loads(call.arguments), schema)

    stream = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Weather?"}], max_tokens=80,
        temperature=0, tools=[WEATHER], tool_choice="required", stream=True,
    )
    deltas = [chunk.choices[0].delta for chunk in stream if chunk.choices]
    calls = [c for delta in deltas for c in delta.tool_calls or []]
    assert [c.function.name for c in calls] == ["get_weather"]


def test_anthropic_forced_tool_and_output_format(urls):
    client = anthropic.Anthropic(base_url=urls, api_key="none", max_retries=0)
    tool = {"name": "get_weather", "description": "Weather in a city",
            "input_schema": WEATHER["function"]["parameters"]}
    message = client.messages.create(
        model="default", max_tokens=80, messages=[{"role": "user", "content": "Weather?"}],
        tools=[tool], tool_choice={"type": "tool", "name": "get_weather"},
    )
    assert message.stop_reason == "tool_use"
    (block,) = [b for b in message.content if b.type == "tool_use"]
    assert block.name == "get_weather" and follows(block.input, tool["input_schema"])
    message = client.messages.create(
        model="default", max_tokens=80, messages=[{"role": "user", "content": "Weather?"}],
        extra_body={"output_config": {"format": {"type": "json_schema", "schema": SCHEMA}}},
    )
    assert follows(json.loads(message.content[0].text), SCHEMA)


def test_an_invalid_schema_is_a_400(client):
    with pytest.raises(openai.BadRequestError, match="cannot be used"):
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}],
            response_format={"type": "json_schema", "json_schema": {
                "name": "x", "schema": {"type": "object", "properties": {"a": {"type": 3}}}}},
        )


@pytest.mark.parametrize("watched", [True, False])
def test_the_grammar_advances_from_the_sampler_or_from_the_tokens(tiny_model, watched):
    """`watch` reads each new token from the sampler (engine fast path); without it the
    processor reads them from `tokens` (any engine that feeds it the sequence so far)."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.sample_utils import make_sampler

    from mlxc.engine.decode.grammar_mask import GrammarProcessor

    _, tokenizer = load(str(tiny_model))
    grammar = grammar_for({"type": "json_schema", "json_schema": {"schema": SCHEMA}}, None, None)
    processor = GrammarProcessor(grammar, tokenizer)
    sample = make_sampler(0.0)
    sample = processor.watch(sample) if watched else sample
    mx.random.seed(0)
    tokens = mx.array(tokenizer.encode("Weather?"))
    out = []
    for _ in range(80):
        logits = processor(tokens, mx.random.normal((1, len(tokenizer))))
        token = sample(logits - mx.logsumexp(logits, keepdims=True))
        if token.item() in tokenizer.eos_token_ids:
            break
        out.append(token.item())
        tokens = mx.concatenate([tokens, token])
    assert follows(json.loads(tokenizer.decode(out)), SCHEMA)


def test_a_grammar_holds_through_the_batch_and_back_to_the_lone_loop(client, urls):
    """A schema-constrained answer made beside short ones (in the batch), then alone again
    once they are done (the batch's last sequence goes back to the lone loop with the token
    it was computing; its grammar must see each token once): it parses, follows the schema
    and is the answer it gets alone."""
    import threading

    import httpx

    fresh = {"Cache-Control": "no-cache, no-store"}  # generated, never a response-cache hit
    asked = {"model": "default", "messages": [{"role": "user", "content": "Weather in Lima?"}],
             "max_tokens": 80, "temperature": 0, "extra_headers": fresh,
             "response_format": {"type": "json_schema", "json_schema": {
                 "name": "weather", "schema": SCHEMA, "strict": True}}}

    def streamed(started: threading.Event) -> str:
        parts = []
        for chunk in client.chat.completions.create(**asked, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                started.set()  # it decodes: the short ones join it in the batch now
        return "".join(parts)

    def short(i: int) -> None:  # two tokens: in the batch for a step or two, then done
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": f"Say {i}"}],
            max_tokens=2, temperature=0, extra_headers=fresh)

    def back_alone() -> int:
        return httpx.get(f"{urls}/health").json()["batch"]["back_alone"]

    alone = client.chat.completions.create(**asked).choices[0].message.content
    for i in range(3):  # their prompts' states cached: later they join in a step or two
        short(i)
    before = back_alone()
    for _ in range(5):  # they must finish while it still decodes: timing, so retried
        result: dict = {}
        started = threading.Event()
        schema = threading.Thread(
            target=lambda result=result, started=started: result.update(text=streamed(started)))
        schema.start()
        assert started.wait(60)
        shorts = [threading.Thread(target=short, args=(i,)) for i in range(3)]
        for thread in shorts:
            thread.start()
        for thread in [schema, *shorts]:
            thread.join(60)
        assert follows(json.loads(result["text"]), SCHEMA)
        assert result["text"] == alone
        if back_alone() > before:
            break
    assert back_alone() > before

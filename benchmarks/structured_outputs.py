"""Structured outputs and forced tool calls on a real model: how many of 50 answers parse
and validate (jsonschema), and what the grammar costs in decode tokens/s.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/structured_outputs.py [--model PATH]
        [--prompts 50] [--speed-tokens 64] [--rounds 3] [--json]

Correctness: N chat requests with a json_schema response_format and N with a forced tool call
(named, "required" and, every third, Anthropic's {"type": "any"}), greedy, through the engine.
Speed: the same story prompt free and held to a schema with a free string, alternating rounds
so load on the machine hits both alike; plus the grammar processor's own time per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mlxc.config import load_settings
from mlxc.engine.worker import Engine
from mlxc.model.refs import resolve_model
from mlxc.request import GenerationRequest

PEOPLE = [("Ada", 36, "London"), ("Linus", 54, "Portland"), ("Marie", 66, "Paris"),
          ("Alan", 41, "Manchester"), ("Grace", 85, "Arlington")]
PRODUCTS = [("kettle", 29.5, True), ("lamp", 12.0, False), ("chair", 89.99, True),
            ("notebook", 3.25, True), ("bicycle", 420.0, False)]
PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"},
                                           "city": {"type": "string"}},
          "required": ["name", "age", "city"], "additionalProperties": False}
PRODUCT = {"type": "object", "properties": {"product": {"type": "string"},
                                            "price": {"type": "number"},
                                            "in_stock": {"type": "boolean"}},
           "required": ["product", "price", "in_stock"], "additionalProperties": False}
SENTIMENT = {"type": "object", "properties": {
    "sentiment": {"enum": ["positive", "negative", "neutral"]},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["sentiment", "confidence"], "additionalProperties": False}
REVIEWS = ["I love this phone, the battery lasts forever.", "The food was cold and late.",
           "It is a chair. It has four legs.", "Best concert I have been to!",
           "The update broke my printer again."]


def _fn(name: str, description: str, properties: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description, "parameters": {
            "type": "object", "properties": properties, "required": required,
            "additionalProperties": False}}}


def _text(description: str) -> dict:
    return {"type": "string", "description": description}


# Described as real tools are (OpenAI's and Anthropic's examples describe every parameter).
TOOLS = [
    _fn("get_weather", "Current weather in a city",
        {"city": _text("The city, e.g. Paris"), "unit": {"enum": ["celsius", "fahrenheit"]}},
        ["city", "unit"]),
    _fn("search_web", "Search the web",
        {"query": _text("What to search for, in a few words"),
         "max_results": {"type": "integer", "description": "How many results, e.g. 5"}},
        ["query"]),
    _fn("send_email", "Send an email",
        {"to": _text("The recipient's name"), "subject": _text("A short subject line"),
         "body": _text("The message, one sentence")}, ["to", "subject", "body"]),
    _fn("calculate", "Evaluate an arithmetic expression",
        {"expression": _text("The expression, e.g. 2 * 3")}, ["expression"]),
]
TOOL_QUESTIONS = [
    ("What's the weather in {city}?", "get_weather"),
    ("Find recent news about {thing}.", "search_web"),
    ("Email {name} that the meeting moved to Friday.", "send_email"),
    ("What is {a} times {b}?", "calculate"),
]


def schema_prompts(n: int) -> list[tuple[str, dict]]:
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            name, age, city = PEOPLE[i % len(PEOPLE)]
            out.append((f"{name} is {age + i} years old and lives in {city}. Give name, age "
                        "and city as JSON.", PERSON))
        elif kind == 1:
            product, price, stock = PRODUCTS[i % len(PRODUCTS)]
            state = "in stock" if stock else "sold out"
            out.append((f"The {product} costs ${price + i}. It is {state}. Describe it as "
                        "JSON.", PRODUCT))
        else:
            out.append((f"Classify the sentiment of this review: {REVIEWS[i % len(REVIEWS)]}",
                        SENTIMENT))
    return out


def tool_prompts(n: int) -> list[tuple[str, object, set[str]]]:
    out = []
    for i in range(n):
        template, tool = TOOL_QUESTIONS[i % len(TOOL_QUESTIONS)]
        name, _age, city = PEOPLE[i % len(PEOPLE)]
        question = template.format(city=city, thing=PRODUCTS[i % 5][0], name=name,
                                   a=i + 3, b=7)
        if i % 3 == 0:
            out.append((question, {"type": "function", "function": {"name": tool}}, {tool}))
        elif i % 3 == 1:
            out.append((question, "required", {t["function"]["name"] for t in TOOLS}))
        else:
            out.append((question, {"type": "any"}, {t["function"]["name"] for t in TOOLS}))
    return out


def ask(engine: Engine, **fields) -> object:
    return engine.submit(GenerationRequest(**fields)).result()


def check_schemas(engine: Engine, n: int, max_tokens: int) -> dict:
    import jsonschema

    valid, failures, tokens = 0, [], 0
    for question, schema in schema_prompts(n):
        answer = ask(engine, messages=[{"role": "user", "content": question}],
                     max_tokens=max_tokens, response_format={
                         "type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
        tokens += answer.usage.completion_tokens
        try:
            jsonschema.validate(json.loads(answer.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            failures.append({"question": question, "answer": answer.text[:200],
                             "finish": answer.finish_reason, "error": str(exc)[:120]})
    return {"valid": valid, "of": n, "mean_tokens": round(tokens / n, 1),
            "failures": failures[:5]}


def check_tool_calls(engine: Engine, n: int, max_tokens: int, penalty: float) -> dict:
    import jsonschema

    valid, failures = 0, []
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for question, tool_choice, names in tool_prompts(n):
        answer = ask(engine, messages=[{"role": "user", "content": question}], tools=TOOLS,
                     tool_choice=tool_choice, max_tokens=max_tokens,
                     repetition_penalty=penalty)
        try:
            (call,) = answer.tool_calls
            name = call["function"]["name"]
            assert name in names, f"{name} not in {names}"
            jsonschema.validate(json.loads(call["function"]["arguments"]), schemas[name])
            assert answer.finish_reason == "tool_calls"
            valid += 1
        except (ValueError, AssertionError, jsonschema.ValidationError) as exc:
            failures.append({"question": question, "answer": answer.text[:200],
                             "calls": answer.tool_calls, "error": str(exc)[:120]})
    return {"valid": valid, "of": n, "repetition_penalty": penalty, "failures": failures[:5]}


def speed(engine: Engine, tokens: int, rounds: int) -> dict:
    from mlxc.engine.decode import grammar_mask

    spent: list[float] = []
    original = grammar_mask.GrammarProcessor.__call__

    def timed(self, tokens_so_far, logits):
        start = time.perf_counter()
        out = original(self, tokens_so_far, logits)
        spent.append(time.perf_counter() - start)
        return out

    grammar_mask.GrammarProcessor.__call__ = timed
    story = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    schema = {"type": "object", "properties": {"story": {"type": "string"}},
              "required": ["story"]}
    free, held = [], []
    for _ in range(rounds):
        a = ask(engine, messages=story, max_tokens=tokens)
        b = ask(engine, messages=story, max_tokens=tokens, response_format={
            "type": "json_schema", "json_schema": {"name": "s", "schema": schema}})
        free.append(a.tokens_per_second)
        held.append(b.tokens_per_second)
    grammar_mask.GrammarProcessor.__call__ = original
    f, h = statistics.median(free), statistics.median(held)
    return {"free_decode_tps": round(f, 2), "structured_decode_tps": round(h, 2),
            "ratio": round(h / f, 3),
            "grammar_us_per_token": round(statistics.median(spent) * 1e6, 1),
            "grammar_share_of_token_time": round(statistics.median(spent) * f, 4)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: mlxc's default)")
    parser.add_argument("--prompts", type=int, default=50)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--speed-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["schemas", "tools", "speed"])
    parser.add_argument("--repetition-penalty", type=float, default=1.0,
                        help="for the forced tool calls (1.0: none)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    settings = load_settings().with_overrides(
        cache_dir=Path(tempfile.mkdtemp(prefix="mlxc-structured-")), model=args.model,
        prefix_memory_bytes=0, prefix_disk_bytes=0,
    )
    engine = Engine(resolve_model(settings.model, settings), settings).start()
    engine.wait_loaded()
    figures: dict = {"model": settings.model}
    if args.only in (None, "speed"):
        figures["speed"] = speed(engine, args.speed_tokens, args.rounds)
    if args.only in (None, "schemas"):
        figures["json_schema"] = check_schemas(engine, args.prompts, args.max_tokens)
    if args.only in (None, "tools"):
        figures["forced_tool_calls"] = check_tool_calls(
            engine, args.prompts, args.max_tokens, args.repetition_penalty)
    engine.shutdown(wait=30)
    print(json.dumps(figures, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

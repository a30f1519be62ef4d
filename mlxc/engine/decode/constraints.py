"""What a request constrains its answer to, as an llguidance grammar: a JSON schema
(`response_format` json_schema / json_object, Anthropic's `output_config.format`) or a forced
tool call (`tool_choice` "required", a named function, Anthropic's {"type": "any"} and
{"type": "tool"}), whose answer is one JSON object `{"name": ..., "arguments": {...}}` with the
arguments held to that tool's parameter schema.

llguidance was picked over outlines-core by measurement (benchmarks/grammar_engines.py, on the
default model's tokenizer): ~30-120 us a token against ~280-640 us, and grammars compile in
~1-3 ms instead of ~30-70 ms; xgrammar needs torch. No MLX here: `grammar_for` runs when a
request is validated, so what cannot be honoured is refused before anything is queued.
"""

from __future__ import annotations

import json
from typing import Any

# Compact JSON: a small model given free whitespace may spend its tokens on newlines.
JSON_OPTIONS = {"whitespace_flexible": False}


class ConstraintError(ValueError):
    """The request asks for a constraint that cannot be honoured (a 400)."""


def tool_name(tool: dict[str, Any]) -> str | None:
    """A tool's name in OpenAI chat's, the Responses API's or Anthropic's shape."""
    function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    return function.get("name")


def tool_parameters(tool: dict[str, Any]) -> dict[str, Any]:
    function = tool.get("function") if isinstance(tool.get("function"), dict) else tool
    schema = function.get("parameters") or function.get("input_schema")
    return schema if isinstance(schema, dict) else {"type": "object"}


def forced_tools(tools: list[dict] | None, tool_choice: Any) -> list[dict] | None:
    """The tools one of which must be called, or None when the model may answer freely."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return None
    if isinstance(tool_choice, dict):
        kind = tool_choice.get("type")
        if kind in ("auto", "none"):
            return None
        if kind == "any":  # Anthropic's "required"
            tool_choice = "required"
    if not tools:
        raise ConstraintError("tool_choice forces a tool call, but the request has no tools")
    if tool_choice == "required":
        return tools
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        name = function.get("name") if isinstance(function, dict) else tool_choice.get("name")
        if tool_choice.get("type") in ("function", "tool") and name:
            chosen = [t for t in tools if tool_name(t) == name]
            if not chosen:
                raise ConstraintError(f"tool_choice names {name!r}, which is not in tools")
            return chosen
    raise ConstraintError(
        f"tool_choice {tool_choice!r} is not understood: use 'auto', 'none', 'required' or "
        "a named function"
    )


def call_schema(tools: list[dict]) -> dict[str, Any]:
    """One call of any of `tools`: {"name": <its name>, "arguments": <its parameters>}."""
    options = [
        {"type": "object", "properties": {"name": {"const": tool_name(t)},
                                          "arguments": tool_parameters(t)},
         "required": ["name", "arguments"], "additionalProperties": False}
        for t in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def response_schema(response_format: dict[str, Any] | None) -> dict[str, Any] | None:
    """The JSON schema a response_format asks for, or None for plain text. Takes OpenAI
    chat's {"type": "json_schema", "json_schema": {"schema": ...}} and the flat
    {"type": "json_schema", "schema": ...} of the Responses API and Anthropic."""
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind == "json_schema":
        inner = response_format.get("json_schema")
        schema = (inner or {}).get("schema") if isinstance(inner, dict) else None
        schema = schema if schema is not None else response_format.get("schema")
        if not isinstance(schema, dict):
            raise ConstraintError("response_format json_schema needs a 'schema' object")
        return schema
    raise ConstraintError(
        f"response_format type {kind!r} is not supported (text, json_object, json_schema are)"
    )


def grammar_for(
    response_format: dict[str, Any] | None, tools: list[dict] | None, tool_choice: Any
) -> str | None:
    """The llguidance grammar the answer must follow, or None; ConstraintError if the
    request's constraint cannot be honoured (an invalid schema, a tool that is not there)."""
    forced = forced_tools(tools, tool_choice)
    schema = response_schema(response_format)
    if forced and schema is not None:
        raise ConstraintError("give either response_format or a forced tool_choice, not both")
    if forced:
        schema = call_schema(forced)
    if schema is None:
        return None
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=JSON_OPTIONS)
    except ValueError as exc:
        raise ConstraintError(f"the JSON schema cannot be used: {exc}") from None
    if error := LLMatcher.validate_grammar(grammar):
        raise ConstraintError(f"the JSON schema cannot be used: {error}")
    return grammar

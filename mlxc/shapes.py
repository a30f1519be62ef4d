"""Shape checks for the loosely typed parts of a request (tool calls, tools, content blocks),
so that a value of the wrong type is a 400 naming it, not a 500 deep in a chat template or
a value silently turned into text. Each returns its input unchanged (cache keys stay as
they were) or raises ValueError, which pydantic reports with the field's path."""

from __future__ import annotations

from typing import Any


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def check_tool_calls(calls: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """OpenAI tool calls: {"id": str, "type": "function", "function": {"name": str,
    "arguments": JSON text (or an object, as some clients send)}}."""
    for i, call in enumerate(calls or ()):
        function = call.get("function")
        _need(isinstance(function, dict), f"tool_calls[{i}].function must be an object")
        _need(isinstance(function.get("name"), str),
              f"tool_calls[{i}].function.name must be a string")
        _need(isinstance(function.get("arguments", "{}"), str | dict),
              f"tool_calls[{i}].function.arguments must be a JSON string")
        _need(call.get("type", "function") == "function",
              f"tool_calls[{i}].type must be 'function'")
        _need(isinstance(call.get("id", ""), str | None), f"tool_calls[{i}].id must be a string")
    return calls


def check_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tools: OpenAI's {"type": "function", "function": {"name", "parameters"}} or the flat
    {"name", "parameters"} shape."""
    for i, tool in enumerate(tools or ()):
        function = tool.get("function", tool)
        _need(isinstance(function, dict), f"tools[{i}].function must be an object")
        _need(isinstance(function.get("name"), str) and function["name"] != "",
              f"tools[{i}] needs a function name (a string)")
        for key in ("parameters", "input_schema"):
            _need(isinstance(function.get(key, {}), dict | bool),
                  f"tools[{i}].{key} must be a JSON schema object")
    return tools


def check_text_part(part: Any, where: str) -> str:
    _need(isinstance(part, dict), f"{where} must be an object")
    _need(isinstance(part.get("text", ""), str), f"{where}.text must be a string")
    return part.get("text", "")


def check_anthropic_content(content: Any) -> Any:
    """Anthropic message content: a string, or a list of blocks: text {text: str}, tool_use
    {id, name: str, input: object}, tool_result {content: str or text blocks}."""
    if isinstance(content, str):
        return content
    for i, block in enumerate(content):
        where = f"content[{i}]"
        _need(isinstance(block, dict) and isinstance(block.get("type"), str),
              f"{where} must be a content block (an object with a type)")
        kind = block["type"]
        if kind == "text":
            check_text_part(block, where)
        elif kind == "tool_use":
            _need(isinstance(block.get("name"), str), f"{where}.name must be a string")
            _need(isinstance(block.get("input", {}), dict), f"{where}.input must be an object")
            _need(isinstance(block.get("id", ""), str), f"{where}.id must be a string")
        elif kind == "tool_result":
            _need(isinstance(block.get("tool_use_id", ""), str),
                  f"{where}.tool_use_id must be a string")
            result = block.get("content", "")
            _need(isinstance(result, str | list),
                  f"{where}.content must be a string or a list of text blocks")
            for j, part in enumerate(result if isinstance(result, list) else ()):
                _need(isinstance(part, dict) and part.get("type") == "text",
                      f"{where}.content[{j}]: only text blocks are supported in tool results")
                check_text_part(part, f"{where}.content[{j}]")
    return content

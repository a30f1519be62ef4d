"""The Responses API's items, to and from canonical messages.

Input: a string, or items — messages (input_text / output_text parts), function_call and
function_call_output items — become the same canonical messages as the equivalent chat
request (an assistant message with `tool_calls`, then `tool` messages), so the two share
their cache key and their prefix. Output: an answer becomes a message item and
function_call items."""

from __future__ import annotations

import json
from typing import Any

from mlxc.request import Answer
from mlxc.server.errors import ApiError
from mlxc.server.flow import strip_billing_header
from mlxc.server.pipeline import refuse

_TEXT_PARTS = {"input_text", "output_text", "text"}
_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "developer": "system"}


def _part_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    texts = []
    for part in content or []:
        kind = part.get("type") if isinstance(part, dict) else None
        if str(kind) in _TEXT_PARTS:  # str(): a list is no key (harden)
            texts.append(str(part.get("text", "")))
        elif kind == "refusal":
            texts.append(str(part.get("refusal", "")))
        else:
            raise ApiError(400, f"{where}: content parts of type {kind!r} are not supported "
                           "(input_text and output_text are)", param=where)
    return "".join(texts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`input` -> canonical messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for i, item in enumerate(items):
        where = f"input.{i}"
        kind = item.get("type", "message")
        if kind == "message":
            role = _ROLES.get(str(item.get("role", "")))  # str(): a list is no key
            if role is None:
                raise ApiError(400, f"{where}: unknown role {item.get('role')!r}", param=where)
            out.append({"role": role, "content": _part_text(item.get("content"), where)})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            last = out[-1] if out else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)  # one turn: text, then calls
                if not last.get("content"):
                    last.pop("content", None)
            else:
                out.append({"role": "assistant", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            content = output if isinstance(output, str) else _part_text(output, where)
            out.append({"role": "tool", "tool_call_id": item.get("call_id"), "content": content})
        elif kind == "reasoning":
            continue  # earlier reasoning is not replayed to the model
        else:
            raise refuse(where, f"{where}: input items of type {kind!r} are not supported "
                         "(message, function_call and function_call_output are)")
    return out


def system_message(instructions: str | None) -> list[dict[str, Any]]:
    text = strip_billing_header(instructions) if instructions else ""
    return [{"role": "system", "content": text}] if text else []


def _functions(tools: list[dict[str, Any]] | None) -> list[tuple[str | None, dict]]:
    """(namespace, function tool) for each function, namespaces opened (Codex groups its
    sub-agent tools in one); any other kind of tool (hosted: web search, files...) is
    refused: the model could not use it."""
    out = []
    for i, tool in enumerate(tools or []):
        kind = tool.get("type")
        if kind == "function":
            out.append((None, tool))
        elif kind == "namespace":
            inner = tool.get("tools") or []
            if any(t.get("type") != "function" for t in inner):
                raise refuse(f"tools.{i}", "namespaces of other than function tools are "
                             "not supported")
            out.extend((tool.get("name"), t) for t in inner)
        else:
            raise refuse(f"tools.{i}", f"tools of type {kind!r} are not supported (function "
                         "tools are; Codex: set web_search = \"disabled\")")
    return out


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses' flat function tools -> the chat shape the canonical request keeps."""
    out = []
    for _, tool in _functions(tools):
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict")
                    if tool.get(k) is not None}
        out.append({"type": "function", "function": function})
    return out or None


def namespaces(tools: list[dict[str, Any]] | None) -> dict[str, str]:
    """Function name -> its namespace, for the calls the model makes."""
    return {t.get("name"): ns for ns, t in _functions(tools) if ns}


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if isinstance(choice, dict):
        if choice.get("type") != "function":
            raise refuse("tool_choice", f"tool_choice {choice.get('type')!r} is not supported")
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def answer_message(answer: Answer, tool_calls: list[dict[str, Any]]) -> dict[str, Any]:
    """The answer as the canonical assistant message a follow-up turn carries."""
    message: dict[str, Any] = {"role": "assistant"}
    if answer.text or not tool_calls:
        message["content"] = answer.text
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def message_item(base: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [output_text(text)] if status == "completed" else []
    return {"id": f"msg_{base}", "type": "message", "status": status, "role": "assistant",
            "content": content}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def function_call_item(base: str, i: int, call: dict[str, Any], status: str = "completed",
                       spaces: dict[str, str] | None = None) -> dict[str, Any]:
    """One tool call as an item; its ids derive from the response's, so that the stream's
    `added` and `done` events and the final response name the same item."""
    function = call.get("function", {})
    arguments = function.get("arguments") or ""
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    item = {"id": f"fc_{base}_{i}", "type": "function_call", "status": status,
            "call_id": call.get("id") or f"call_{base}_{i}", "name": function.get("name"),
            "arguments": arguments if status == "completed" else ""}
    if namespace := (spaces or {}).get(item["name"]):
        item["namespace"] = namespace
    return item


def says_text(answer: Answer, tool_calls: list[dict[str, Any]]) -> bool:
    """A message item is sent if the answer said something, or did nothing else."""
    return bool(answer.text) or not tool_calls


def output_items(answer: Answer, tool_calls: list[dict[str, Any]], base: str,
                 spaces: dict[str, str] | None = None) -> list[dict]:
    """The answer's items: a message, then one function_call per tool call."""
    items = [message_item(base, answer.text)] if says_text(answer, tool_calls) else []
    items.extend(function_call_item(base, i, call, spaces=spaces)
                 for i, call in enumerate(tool_calls))
    return items

"""Tool calls: messages shaped for chat templates, and tool-call markup cut out of the
generated text and parsed into OpenAI's shape. The markers and the parser are the ones
mlx-lm picks for the model's tokenizer (`tool_call_start`, `tool_call_end`, `tool_parser`).
No MLX here: this only works on text."""

from __future__ import annotations

import json
import uuid
from typing import Any

from mlxc.engine.decode.constraints import forced_tools, tool_name, tool_parameters
from mlxc.engine.decode.stops import StopMatcher
from mlxc.request import GenerationRequest, Message


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """Messages as chat templates expect them: tool-call arguments as objects (OpenAI
    sends them as JSON strings; templates would print them quoted twice)."""
    out = []
    for message in messages:
        m = message.model_dump(exclude_none=True)
        if "tool_calls" in m:
            m.setdefault("content", "")
            calls = []
            for call in m["tool_calls"]:
                function = dict(call.get("function") or {})
                if isinstance(function.get("arguments"), str):
                    try:
                        function["arguments"] = json.loads(function["arguments"])
                    except ValueError:
                        pass  # not JSON: the template gets it as written
                calls.append({**call, "function": function})
            m["tool_calls"] = calls
        out.append(m)
    return out


def template_knows_tools(tokenizer: Any) -> bool:
    """Whether the chat template renders a `tools` list (else it would drop them unseen)."""
    return "tools" in (getattr(tokenizer, "chat_template", None) or "")


def described_tools(request: GenerationRequest, tokenizer: Any) -> list[dict] | None:
    """The tools to describe in the system message: those on offer when the template knows
    none."""
    return None if template_knows_tools(tokenizer) else tools_on_offer(request)


def tools_on_offer(request: GenerationRequest) -> list[dict] | None:
    """The tools the model may call: a forced call's, or all of them (`auto`); none for
    `tool_choice: none`."""
    if not request.tools:
        return None
    forced = forced_tools(request.tools, request.tool_choice)
    if forced:
        return forced
    none = request.tool_choice == "none" or (
        isinstance(request.tool_choice, dict) and request.tool_choice.get("type") == "none"
    )
    return None if none else request.tools


def prompt_messages(
    request: GenerationRequest, tokenizer: Any
) -> tuple[list[dict[str, Any]], list[dict] | None]:
    """The messages and tools to render. With a template that knows no tools (it would drop
    them, and the client would believe they were offered), the tools are described in the
    system message instead, with the JSON shape a call takes."""
    messages = template_messages(request.messages)
    offered = described_tools(request, tokenizer)
    if offered is None:
        return messages, request.tools
    described = [
        {"name": tool_name(t), "description": (t.get("function") or t).get("description", ""),
         "parameters": tool_parameters(t)}
        for t in offered
    ]
    shape = 'a JSON object {"name": <tool name>, "arguments": <arguments>}'
    if forced_tools(request.tools, request.tool_choice):
        ask = ("it" if len(offered) == 1 else "one of them") + f" now: answer with only {shape}."
    else:
        ask = f"one when it helps: answer with only {shape} and nothing else; otherwise answer."
    note = "You can call these tools:\n" + json.dumps(described, ensure_ascii=False) + "\nCall "
    note += ask
    if messages and messages[0]["role"] == "system":
        system = f"{messages[0].get('content') or ''}\n\n{note}"
        return [{**messages[0], "content": system}, *messages[1:]], None
    return [{"role": "system", "content": note}, *messages], None


def answer_filter(
    request: GenerationRequest, tokenizer: Any
) -> ToolCallFilter | ForcedCall | OptionalCall:
    """What cuts tool calls out of the answer: the model's own markup; for a forced call
    (whose whole answer the grammar makes one JSON call) the answer itself; for tools on
    offer, also an answer that is one such JSON call."""
    stops = StopMatcher(request.stop)
    if forced_tools(request.tools, request.tool_choice):
        return ForcedCall(stops)
    offered = {tool_name(t) for t in tools_on_offer(request) or []}
    if described_tools(request, tokenizer):
        return OptionalCall(stops, offered)
    # Models whose template knows tools (Qwen2.5-Coder) also write a call as bare JSON, with
    # no markup: the same recovery as for described tools, for a tool on offer only.
    return ToolCallFilter(stops, tokenizer, request.tools, offered)


def _partial_marker(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallFilter:
    """A StopMatcher (same `feed`/`flush`) that also holds back the text between the
    model's tool-call markers and parses each call when it closes, and, with `names` (the
    tools on offer), holds an answer that may be one bare JSON call for one of them (see
    `BareCall`). Without tools in the request, or a tokenizer that knows no tool-call format,
    other text passes straight through."""

    def __init__(self, stops: StopMatcher, tokenizer: Any = None, tools: list | None = None,
                 names: set[str] | frozenset[str] = frozenset()):
        self.stops = stops
        self.tool_calls: list[dict[str, Any]] = []
        self._bare = BareCall(names) if names else None
        enabled = bool(tools) and bool(getattr(tokenizer, "has_tool_calling", False))
        self._start = tokenizer.tool_call_start if enabled else None
        self._end = (tokenizer.tool_call_end or "") if enabled else ""
        self._parse = tokenizer.tool_parser if enabled else None
        self._tools = tools
        self._buffer = ""
        self._in_call = False

    def feed(self, segment: str) -> tuple[str, bool]:
        emit, stopped = self.stops.feed(segment)
        if self._bare is not None:
            emit = self._bare.feed(emit)
        return self._split(emit), stopped

    def flush(self) -> str:
        tail = self.stops.flush()
        if self._bare is not None:
            call, tail = self._bare.flush(tail)
            if call is not None:
                self.tool_calls.append(call)
        shown = self._split(tail)
        rest, self._buffer = self._buffer, ""
        if self._in_call:  # a format without an end marker, or a call cut off by max_tokens
            self._in_call = False
            return shown + self._add(rest)
        return shown + rest

    def finish_reason(self, finish: str) -> str:
        return "tool_calls" if self.tool_calls and finish == "stop" else finish

    def _split(self, text: str) -> str:
        if self._start is None:
            return text
        self._buffer += text
        shown = []
        while True:
            if not self._in_call:
                i = self._buffer.find(self._start)
                if i < 0:
                    cut = len(self._buffer) - _partial_marker(self._buffer, self._start)
                    shown.append(self._buffer[:cut])
                    self._buffer = self._buffer[cut:]
                    break
                shown.append(self._buffer[:i])
                self._buffer = self._buffer[i + len(self._start) :]
                self._in_call = True
            else:
                j = self._buffer.find(self._end) if self._end else -1
                if j < 0:
                    break
                shown.append(self._add(self._buffer[:j]))
                self._buffer = self._buffer[j + len(self._end) :]
                self._in_call = False
        return "".join(shown)

    def _add(self, text: str) -> str:
        """Parse one call; text that does not parse is shown as written, not lost."""
        try:
            parsed = self._parse(text, self._tools)
        except Exception:  # each model family's parser raises its own kinds
            parsed = None
        calls = parsed if isinstance(parsed, list) else [parsed]
        if not all(isinstance(c, dict) and c.get("name") for c in calls):
            return f"{self._start}{text}{self._end}"
        for call in calls:
            arguments = call.get("arguments", {})
            if not isinstance(arguments, str):
                arguments = json.dumps(arguments, ensure_ascii=False)
            self.tool_calls.append({
                "id": call.get("id") or f"call_{uuid.uuid4().hex[:24]}",
                "type": "function",
                "function": {"name": call["name"], "arguments": arguments},
            })
        return ""


class ForcedCall:
    """The filter for a forced call: the answer is `{"name": ..., "arguments": {...}}` (the
    grammar sees to it), held back and turned into one call at the end. An answer cut short
    (max_tokens) does not parse and is shown as text, with finish reason "length"."""

    def __init__(self, stops: StopMatcher) -> None:
        self.stops = stops
        self.tool_calls: list[dict[str, Any]] = []
        self._text = ""

    def feed(self, segment: str) -> tuple[str, bool]:
        emit, stopped = self.stops.feed(segment)
        self._text += emit
        return "", stopped

    def flush(self) -> str:
        text, self._text = self._text + self.stops.flush(), ""
        if call := _as_call(text):
            self.tool_calls.append(call)
            return ""
        return text

    def finish_reason(self, finish: str) -> str:
        return "tool_calls" if self.tool_calls and finish == "stop" else finish


def _as_call(text: str, names: set[str] | None = None) -> dict[str, Any] | None:
    """`{"name": ..., "arguments": {...}}` (a ```json fence around it allowed) as a call."""
    body = text.strip()
    if body.startswith("```"):
        body = body.strip("`").removeprefix("json").strip()
    try:
        call = json.loads(body)
        name, arguments = call["name"], call["arguments"]
    except (ValueError, TypeError, KeyError):
        return None
    if not isinstance(name, str) or (names is not None and name not in names):
        return None
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


class BareCall:
    """An answer that may be one bare `{"name", "arguments"}` call for a tool on offer: held
    back while it opens like a JSON object (or a ```json fence), a call if the whole of it is
    one; any other answer streams as text (held text is shown as written, never lost)."""

    def __init__(self, names: set[str] | frozenset[str]) -> None:
        self.names = names
        self._held: str | None = ""  # None once the answer is known to be text

    def feed(self, text: str) -> str:
        """What may be shown now of the answer's next `text`."""
        if self._held is None:
            return text
        self._held += text
        start = self._held.lstrip()
        if not start or start.startswith(("{", "```")) or "```".startswith(start):
            return ""
        text, self._held = self._held, None
        return text

    def flush(self, tail: str) -> tuple[dict[str, Any] | None, str]:
        """At the answer's end: (its call, "") or (None, the text still to show)."""
        if self._held is None:
            return None, tail
        text, self._held = self._held + tail, None
        call = _as_call(text, self.names)
        return (call, "") if call else (None, text)


class OptionalCall(ForcedCall):
    """The filter for tools described in the prompt (`auto` with a template that knows no
    tools): the answer may be one bare JSON call (`BareCall`)."""

    def __init__(self, stops: StopMatcher, names: set[str]) -> None:
        super().__init__(stops)
        self._bare = BareCall(names)

    def feed(self, segment: str) -> tuple[str, bool]:
        emit, stopped = self.stops.feed(segment)
        return self._bare.feed(emit), stopped

    def flush(self) -> str:
        call, text = self._bare.flush(self.stops.flush())
        if call is not None:
            self.tool_calls.append(call)
        return text

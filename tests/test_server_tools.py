"""Tool calls cut out of streamed text and parsed with mlx-lm's own parser (json_tools: the
Qwen/Hermes `<tool_call>{...}</tool_call>` format), and messages shaped for templates."""

from __future__ import annotations

import json
from types import SimpleNamespace

from mlx_lm.tool_parsers import json_tools

from mlxc.engine.decode.stops import StopMatcher
from mlxc.engine.decode.tools import ToolCallFilter, template_messages
from mlxc.request import Message

# The four attributes mlx-lm's TokenizerWrapper exposes for a json_tools model.
TOKENIZER = SimpleNamespace(
    has_tool_calling=True,
    tool_call_start=json_tools.tool_call_start,
    tool_call_end=json_tools.tool_call_end,
    tool_parser=json_tools.parse_tool_call,
)
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def run(pieces: list[str], stops: list[str] | None = None, tools=TOOLS, finish="stop"):
    f = ToolCallFilter(StopMatcher(stops or []), TOKENIZER, tools)
    shown = "".join(f.feed(p)[0] for p in pieces) + f.flush()
    return shown, f.tool_calls, f.finish_reason(finish)


def test_call_split_across_pieces_is_hidden_and_parsed():
    text = 'Let me check. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    pieces = [text[i : i + 3] for i in range(0, len(text), 3)] + ["</tool", "_call>", " ok"]
    shown, calls, finish = run(pieces)
    assert shown == "Let me check.  ok"
    assert calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert finish == "tool_calls"


def test_two_calls_and_a_partial_marker_that_is_not_one():
    one = '<tool_call>{"name": "a", "arguments": {}}</tool_call>'
    two = '<tool_call>{"name": "b", "arguments": {"x": 1}}</tool_call>'
    shown, calls, _ = run(["x <tool", "ing> y ", one, two, " <tool"])
    assert shown == "x <tooling> y  <tool"
    assert [c["function"]["name"] for c in calls] == ["a", "b"]


def test_unparsable_call_is_shown_as_written_and_cut_call_is_kept():
    shown, calls, finish = run(["<tool_call>not json</tool_call>"])
    assert shown == "<tool_call>not json</tool_call>" and calls == [] and finish == "stop"
    shown, calls, finish = run(['<tool_call>{"name": "a", "arguments": {}}'], finish="length")
    assert shown == "" and len(calls) == 1 and finish == "length"


def test_without_tools_text_passes_through_and_stops_still_apply():
    shown, calls, _ = run(["<tool_call>{}</tool_call> END more"], stops=["END"], tools=None)
    assert shown == "<tool_call>{}</tool_call> " and calls == []


def test_template_messages_turn_argument_strings_into_objects():
    call = {"id": "c1", "type": "function",
            "function": {"name": "f", "arguments": json.dumps({"city": "Paris"})}}
    messages = [Message(role="user", content="hi"),
                Message(role="assistant", tool_calls=[call]),
                Message(role="tool", content="sunny", tool_call_id="c1")]
    shaped = template_messages(messages)
    assert shaped[0] == {"role": "user", "content": "hi"}
    assert shaped[1]["content"] == ""
    assert shaped[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}
    assert messages[1].tool_calls[0]["function"]["arguments"] == '{"city": "Paris"}'


# A template that renders no `tools` (as SmolLM2's): tools are described in the prompt instead.
PLAIN = SimpleNamespace(chat_template="{% for m in messages %}{{ m.content }}{% endfor %}")


def offered(tool_choice=None):
    from mlxc.engine.decode.tools import answer_filter, prompt_messages
    from mlxc.request import GenerationRequest

    request = GenerationRequest(
        messages=[{"role": "user", "content": "Weather in Paris?"}], tools=TOOLS,
        tool_choice=tool_choice,
    )
    return prompt_messages(request, PLAIN), answer_filter(request, PLAIN)


def test_auto_tools_with_a_template_that_knows_none_are_described_not_dropped():
    (messages, tools), _ = offered()
    assert tools is None and messages[0]["role"] == "system"
    assert "get_weather" in messages[0]["content"] and "otherwise answer" in messages[0]["content"]
    (messages, tools), _ = offered("none")
    assert messages == [{"role": "user", "content": "Weather in Paris?"}] and tools == TOOLS


def feed_all(f, pieces):
    shown = [f.feed(p)[0] for p in pieces]
    return shown, shown and "".join(shown) + f.flush()


def test_an_answer_that_is_one_json_call_becomes_a_call():
    _, f = offered()
    shown, text = feed_all(f, [' {"name": "get_', 'weather", "arguments": {"city": "Paris"}}'])
    assert text == "" and f.finish_reason("stop") == "tool_calls"
    assert f.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    _, f = offered()
    _, text = feed_all(f, ['```json\n{"name": "get_weather", "arguments": {}}\n```'])
    assert text == "" and len(f.tool_calls) == 1


def test_a_text_answer_streams_at_once_and_a_foreign_call_stays_text():
    _, f = offered()
    shown, text = feed_all(f, ["It is", " sunny."])
    assert shown == ["It is", " sunny."] and text == "It is sunny." and f.tool_calls == []
    _, f = offered()
    _, text = feed_all(f, ['{"name": "rm_rf", "arguments": {}}'])
    assert text == '{"name": "rm_rf", "arguments": {}}' and f.tool_calls == []
    assert f.finish_reason("stop") == "stop"

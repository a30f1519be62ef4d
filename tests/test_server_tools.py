"""Tool calls cut out of streamed text and parsed with mlx-lm's own parser (json_tools: the
Qwen/Hermes `<tool_call>{...}</tool_call>` format), and messages shaped for templates."""

from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import pytest
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


# Qwen2.5's chat template (Qwen2.5-Coder-*-Instruct ships the same), as on the hub: it knows
# tools, so mlx-lm picks its json_tools parser, and mlxc hands the tools to the template.
QWEN25_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""  # noqa: E501


@pytest.fixture(scope="module")
def qwen_tokenizer(tiny_model, tmp_path_factory):
    """mlx-lm's TokenizerWrapper, loaded by `mlx_lm.load` as the engine loads it, for the
    tiny model given Qwen2.5's template."""
    from mlx_lm import load

    folder = tmp_path_factory.mktemp("m") / "tiny-qwen-template"
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns(".mlxc-fingerprint.json"))
    (folder / "chat_template.jinja").write_text(QWEN25_TEMPLATE)
    tokenizer = load(str(folder))[1]
    assert tokenizer.tool_parser is json_tools.parse_tool_call  # mlx-lm read the template
    return tokenizer


def answer_of(tokenizer, said: str, tool_choice=None, tools=TOOLS):
    """The answer a sequence makes of `said` (its tokens, then the end token), through the
    engine's own path: answer_filter, the Sequence's detokenizing and publishing."""
    from mlxc.engine.batch.sequence import Sequence
    from mlxc.engine.decode.sampling import SequenceSampling
    from mlxc.engine.decode.tools import answer_filter
    from mlxc.request import GenerationRequest
    from mlxc.stream import Generation

    request = GenerationRequest(messages=[{"role": "user", "content": "Weather in Paris?"}],
                                tools=tools, tool_choice=tool_choice, max_tokens=200)
    seq = Sequence(request=request, generation=Generation(), prompt=[1], reused=0, cached=0,
                   sampling=SequenceSampling(sampler=None), detokenizer=tokenizer.detokenizer,
                   stops=answer_filter(request, tokenizer), eos=set(tokenizer.eos_token_ids),
                   prefill=None, cache=[])
    tokens = tokenizer.encode(said, add_special_tokens=False) + [tokenizer.eos_token_id]
    assert not any(seq.take(t, None) for t in tokens[:-1]) and seq.take(tokens[-1], None)
    return seq.answer("tiny")


BARE = '{"name": "get_weather", "arguments": {"city": "Paris"}}'


def test_a_bare_json_call_is_a_call_with_a_template_that_knows_tools(qwen_tokenizer):
    """Qwen2.5-Coder under tool_choice auto often writes the call without its <tool_call>
    markup: for a tool on offer, a whole answer that is that object is the call."""
    from mlxc.engine.decode.tools import prompt_messages
    from mlxc.request import GenerationRequest

    request = GenerationRequest(messages=[{"role": "user", "content": "Weather?"}], tools=TOOLS)
    messages, tools = prompt_messages(request, qwen_tokenizer)
    assert tools == TOOLS and "<tools>" in qwen_tokenizer.apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True)  # not described
    for said in (BARE, f"\n{BARE}\n", f"```json\n{BARE}\n```"):
        for choice in (None, "auto"):
            answer = answer_of(qwen_tokenizer, said, choice)
            assert answer.text == "" and answer.finish_reason == "tool_calls", said
            assert answer.tool_calls[0]["function"] == {
                "name": "get_weather", "arguments": '{"city": "Paris"}'}
    marked = answer_of(qwen_tokenizer, f"<tool_call>\n{BARE}\n</tool_call>")  # as before
    assert marked.text == "" and len(marked.tool_calls) == 1


def test_only_a_whole_answer_for_a_tool_on_offer_becomes_a_call(qwen_tokenizer):
    for said in ('{"name": "rm_rf", "arguments": {}}', f"{BARE} Done.", f"Sure: {BARE}",
                 '{"city": "Paris"}', "It is sunny."):
        answer = answer_of(qwen_tokenizer, said)
        assert (answer.text, answer.tool_calls, answer.finish_reason) == (said, [], "stop")
    answer = answer_of(qwen_tokenizer, BARE, tools=None)  # no tools: JSON is an answer
    assert answer.text == BARE and answer.tool_calls == []
    answer = answer_of(qwen_tokenizer, BARE, "none")  # tools offered, then withdrawn
    assert answer.text == BARE and answer.tool_calls == []

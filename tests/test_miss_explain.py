"""Miss explanations (issue 27): where a second turn parted from the stored prefix, as message
index, role and character, for hand-made conversations changed at a known place; and what
working it out costs per request."""

from __future__ import annotations

import copy
import json
from os.path import commonprefix
from types import SimpleNamespace

import pytest
from transformers import AutoTokenizer

from mlxc.engine.kv.blocks import Block, BlockTree, chain_hash, token_array
from mlxc.engine.kv.divergence import explain
from mlxc.request import GenerationRequest

TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>tools\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SYSTEM = "You are a helpful assistant. Answer briefly and cite the capital of France."
TURN1 = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": "What is the capital of France? Answer briefly, please."},
    {"role": "assistant", "content": "Paris is the capital and largest city of France."},
    {"role": "user", "content": "The quick brown fox jumps over the lazy dog."},
    {"role": "assistant", "content": "MLX is an array framework for machine learning."},
]
NEXT = {"role": "user", "content": "def add(a, b): return a + b"}


def _tool(name: str, about: str) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": about,
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


TOOLS = [_tool("weather", "The weather in a city."), _tool("capital", "A country's capital.")]


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_model):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = TOOLS_TEMPLATE
    return tok


def _encode(tok, messages, tools=None, prompt=True) -> list[int]:
    text = tok.apply_chat_template(messages, tools=tools, add_generation_prompt=prompt,
                                   tokenize=False)
    return tok.encode(text, add_special_tokens=False)


def _tree(tokens: list[int], size: int = 16) -> SimpleNamespace:
    """A block tree holding `tokens` (as the prefix cache stores a turn), on 'disk'."""
    tree = BlockTree("root", 1 << 30)
    parent = tree.root
    for start in range(0, len(tokens), size):
        chunk = tokens[start : start + size]
        name = chain_hash(parent, chunk)
        tree.add(Block(name, parent, start, token_array(chunk), on_disk=True))
        parent = name
    return SimpleNamespace(tree=tree)


def _edit(messages, index, old, new):
    out = copy.deepcopy(messages)
    assert old in out[index]["content"]
    out[index]["content"] = out[index]["content"].replace(old, new, 1)
    return out


def _first_difference(a: str, b: str) -> int:
    return len(commonprefix([a, b]))


def _explain(tok, old_messages, new_messages, old_tools=None, new_tools=None):
    """Store the first conversation (prompt and answer, as served), then explain the second."""
    stored = _encode(tok, old_messages, old_tools, prompt=False)
    tokens = _encode(tok, new_messages, new_tools)
    report = explain(_tree(stored), tokens, 0, {})
    request = GenerationRequest(messages=new_messages, tools=new_tools)
    report.attach(tok, request, tokens)
    return report.resolve()


# (name, old messages, new messages, index of the changed message)
EDITS = [
    ("system line edited", TURN1, _edit(TURN1, 0, "helpful", "careful"), 0),
    ("system line appended", TURN1, _edit(TURN1, 0, "France.", "France. Be kind."), 0),
    ("first user message, first word", TURN1, _edit(TURN1, 1, "What is", "Which is"), 1),
    ("first user message, middle", TURN1, _edit(TURN1, 1, "briefly", "at length"), 1),
    ("an earlier answer edited", TURN1, _edit(TURN1, 2, "largest", "oldest"), 2),
    ("a later user message edited", TURN1, _edit(TURN1, 3, "lazy dog", "sleepy cat"), 3),
    ("accented text edited", _edit(TURN1, 3, "dog.", "dog, café crème."),
     _edit(TURN1, 3, "dog.", "dog, café noir."), 3),
]


@pytest.mark.parametrize("name,old,new,index", EDITS, ids=[e[0] for e in EDITS])
def test_an_edited_message_is_named_with_its_character(tokenizer, name, old, new, index):
    report = _explain(tokenizer, old, [*new, NEXT])
    expected = _first_difference(old[index]["content"], new[index]["content"])
    assert report.where is not None, report
    assert (report.where.part, report.where.index, report.where.role, report.where.char) == (
        "message", index, new[index]["role"], expected)
    assert report.header().endswith(f"diverged=message {index} @ char {expected}")
    shown = report.excerpts
    assert shown["old"] and shown["new"] and shown["old"] != shown["new"]
    assert len(shown["before"]) <= 60 and len(shown["old"]) <= 60


def test_a_role_changed_is_named_by_the_message(tokenizer):
    new = copy.deepcopy(TURN1)
    new[3]["role"] = "system"
    report = _explain(tokenizer, TURN1, [*new, NEXT])
    assert (report.where.part, report.where.index) == ("markup", 3)


def test_tool_order_is_named_when_the_template_renders_tools(tool_tokenizer):
    report = _explain(tool_tokenizer, TURN1, [*TURN1, NEXT], TOOLS, TOOLS[::-1])
    old_text = "".join(json.dumps(t) + "\n" for t in TOOLS)
    new_text = "".join(json.dumps(t) + "\n" for t in TOOLS[::-1])
    offset = len("tools\n")  # the template's own words inside the tools block
    assert (report.where.part, report.where.char) == (
        "tools", offset + _first_difference(old_text, new_text))


def test_tool_order_is_named_when_tools_are_described_in_the_system_prompt(tokenizer):
    from mlxc.engine.decode.tools import prompt_messages

    new_request = GenerationRequest(messages=[*TURN1, NEXT], tools=TOOLS[::-1])
    old_request = GenerationRequest(messages=TURN1, tools=TOOLS)
    old_messages, _ = prompt_messages(old_request, tokenizer)
    stored = _encode(tokenizer, old_messages, None, prompt=False)
    new_messages, _ = prompt_messages(new_request, tokenizer)
    tokens = _encode(tokenizer, new_messages)
    report = explain(_tree(stored), tokens, 0, {})
    report.attach(tokenizer, new_request, tokens)
    report.resolve()
    expected = _first_difference(old_messages[0]["content"], new_messages[0]["content"])
    assert (report.where.part, report.where.char) == ("tools", expected - len(SYSTEM) - 2)


def test_a_follow_up_that_extends_the_stored_turn_is_a_full_reuse(tokenizer):
    stored = _encode(tokenizer, TURN1, prompt=False)
    tokens = _encode(tokenizer, [*TURN1, NEXT])
    report = explain(_tree(stored), tokens, len(stored), {"memory": len(stored)})
    assert report.diverged_at is None and report.full
    assert report.header() == f"reused={len(stored)}/{len(tokens)}; tier=memory; " \
                               "diverged=none (full reuse)"
    assert report.as_dict()["full_reuse"] is True


def test_nothing_stored_says_so(tokenizer):
    tokens = _encode(tokenizer, TURN1)
    report = explain(SimpleNamespace(tree=BlockTree("root", 1 << 20)), tokens, 0, {})
    assert report.diverged_at is None and not report.full
    assert report.header().endswith("tier=none; diverged=none")


def test_excerpts_can_be_left_out(tokenizer):
    stored = _encode(tokenizer, TURN1, prompt=False)
    new = [*_edit(TURN1, 1, "briefly", "at length"), NEXT]
    tokens = _encode(tokenizer, new)
    report = explain(_tree(stored), tokens, 0, {})
    report.attach(tokenizer, GenerationRequest(messages=new), tokens)
    report.resolve(excerpts=False)
    assert report.excerpts is None and report.where.index == 1
    assert "excerpt" not in report.as_dict(excerpts=False)["diverged"]


def test_a_20k_prompt_stored_in_blocks_is_explained_at_its_token():
    """A 20,000-token prompt stored in 256-token blocks, parting at token 15,000 (what it costs:
    benchmarks/diagnostics/miss_explain.py)."""
    stored = [(i * 7919) % 50000 for i in range(20_000)]
    tokens = token_array([*stored[:15_000], 1, *stored[15_001:]])
    report = explain(_tree(stored, size=256), tokens, 15_000, {"memory": 15_000})
    assert report.diverged_at == 15_000

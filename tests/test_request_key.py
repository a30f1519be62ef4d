"""The cache key: stable across processes, sensitive to everything that changes the output."""

from __future__ import annotations

import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from mlxc.conversation import build_messages
from mlxc.request import GenerationRequest
from mlxc.request_key import cache_key, chat_payload

FP = "f" * 64
BASE = {"messages": [{"role": "user", "content": "What is MLX?"}]}


def key(**changes) -> str:
    return GenerationRequest(**{**BASE, **changes}).cache_key(FP)


def test_key_is_identical_in_another_process():
    code = (
        "from mlxc.request import GenerationRequest as R;"
        f"print(R(messages=[{{'role':'user','content':'What is MLX?'}}]).cache_key('{FP}'))"
    )
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other.stdout.strip() == key()


def test_defaults_are_filled_before_hashing():
    assert key() == key(temperature=0, top_p=1, max_tokens=512, stop=None)
    assert key(temperature=0) == key(temperature=0.0)


def test_dict_order_does_not_matter():
    reordered = {"content": "What is MLX?", "role": "user"}
    assert key(messages=[reordered]) == key()
    tool_a = {"type": "function", "function": {"name": "f", "parameters": {"a": 1, "b": 2}}}
    tool_b = {"function": {"parameters": {"b": 2, "a": 1}, "name": "f"}, "type": "function"}
    assert key(tools=[tool_a]) == key(tools=[tool_b])


def test_text_parts_hash_like_plain_text():
    parts = [{"type": "text", "text": "What is "}, {"type": "text", "text": "MLX?"}]
    assert key(messages=[{"role": "user", "content": parts}]) == key()


@pytest.mark.parametrize(
    "change",
    [
        {"messages": [{"role": "user", "content": "What is MLX!"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, *BASE["messages"]]},
        {"temperature": 0.7},
        {"top_p": 0.9},
        {"top_k": 40},
        {"min_p": 0.05},
        {"repetition_penalty": 1.1},
        {"presence_penalty": 0.5},
        {"frequency_penalty": 0.5},
        {"seed": 1},
        {"max_tokens": 100},
        {"stop": ["\n"]},
        {"tools": [{"type": "function", "function": {"name": "f"}}]},
        {"tool_choice": "none"},
        {"response_format": {"type": "json_object"}},
    ],
)
def test_every_output_changing_field_changes_the_key(change):
    assert key(**change) != key()


def test_model_fingerprint_changes_the_key():
    request = GenerationRequest(**BASE)
    assert request.cache_key("a" * 64) != request.cache_key("b" * 64)


def test_stream_is_not_part_of_the_request():
    # Streaming is a transport choice: front ends drop it before building the request.
    with pytest.raises(ValidationError):
        GenerationRequest(**BASE, stream=True)


@pytest.mark.parametrize(
    "bad",
    [
        {"max_tokens": 0},
        {"max_tokens": -5},
        {"max_tokens": 10**9},
        {"temperature": -1},
        {"messages": []},
        {"messages": [{"role": "user", "content": "   "}]},
        {"messages": [{"role": "wizard", "content": "hi"}]},
    ],
)
def test_bad_requests_are_rejected(bad):
    with pytest.raises(ValidationError):
        GenerationRequest(**{**BASE, **bad})


def test_determinism_rule():
    assert GenerationRequest(**BASE).is_deterministic
    assert GenerationRequest(**BASE, temperature=0.8, seed=3).is_deterministic
    assert not GenerationRequest(**BASE, temperature=0.8).is_deterministic


@settings(max_examples=200, deadline=None)
@given(
    prompt=st.text(min_size=1).filter(str.strip), system=st.none() | st.text(min_size=1),
    max_tokens=st.integers(1, 32768), temperature=st.floats(0, 2) | st.integers(0, 2),
    top_p=st.floats(0.01, 1), seed=st.none() | st.integers(0, 2**64 - 1),
)
def test_the_hit_paths_key_without_pydantic_is_the_requests(prompt, system, max_tokens,
                                                             temperature, top_p, seed):
    """`mlxc ask`'s hit path keys its chat request by hand (request_key.chat_payload): the
    dump must be pydantic's exactly, a field added to GenerationRequest included."""
    messages = build_messages(prompt, system, None)
    request = GenerationRequest(messages=messages, max_tokens=max_tokens,
                                temperature=temperature, top_p=top_p, seed=seed)
    payload = chat_payload(messages, max_tokens, temperature, top_p, seed)
    assert payload == request.model_dump(mode="json")
    assert cache_key(payload, FP) == request.cache_key(FP)

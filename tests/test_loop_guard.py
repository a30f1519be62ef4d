"""The loop guard of grammar-held JSON (engine/decode/loop_guard.py), through the real
GrammarProcessor, llguidance and mlx-lm's tokenizer: a string or number that loops may only
end; an answer without such a loop gets exactly the grammar's own masks, token by token."""

from __future__ import annotations

import json

import llguidance
import numpy as np
import pytest

from mlxc.engine.decode.constraints import grammar_for

PERSON = {"type": "object", "properties": {"name": {"type": "string"},
                                           "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}}


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from mlx_lm import load

    return load(str(tiny_model))[1]


def masks(tokenizer, text: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Before each token of `text` (and after the last): (what the processor allows, what the
    grammar alone allows)."""
    import mlx.core as mx

    from mlxc.engine.decode.grammar_mask import GrammarProcessor, llguidance_tokenizer

    grammar = grammar_for(FORMAT, None, None)
    processor = GrammarProcessor(grammar, tokenizer)
    plain = llguidance.LLMatcher(llguidance_tokenizer(tokenizer), grammar)
    vocab = len(tokenizer)
    bits = np.zeros((vocab + 31) // 32, dtype=np.int32)
    tokens = tokenizer.encode("Who?")
    out = []
    for token in [*tokenizer.encode(text, add_special_tokens=False), None]:
        logits = processor(mx.array(tokens), mx.zeros((1, vocab)))
        plain.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        grammar_allows = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab]
        out.append((np.isfinite(np.array(logits[0])), grammar_allows.astype(bool)))
        if token is not None:
            assert plain.consume_token(token), text
            tokens.append(token)
    return out


@pytest.mark.parametrize("text", [
    '{"name":"The quick brown fox jumps over the lazy dog. Paris is the capital and largest '
    'city of France. MLX is an array framework for machine learning on Apple silicon.",'
    '"age":1000000000',
    '{"name":"ha ha ha ha ha, ha ha!","age":-100000000000',  # short repeats: left alone
])
def test_an_answer_without_a_loop_gets_the_grammars_own_masks(tokenizer, text):
    json.loads(text + "}")
    for allowed, grammar_allows in masks(tokenizer, text):
        assert (allowed == grammar_allows).all()


@pytest.mark.parametrize(("text", "closes"), [
    ('{"name":"' + " dog" * 16, '"'),  # one token, sixteen times
    ('{"name":"' + " lazy dog" * 8, '"'),  # a unit of two
    ('{"name":"Ada","age":1' + "0" * 16, ","),
])
def test_a_value_that_loops_may_only_end(tokenizer, text, closes):
    *before, (allowed, grammar_allows) = masks(tokenizer, text)
    assert all((a == g).all() for a, g in before)  # left alone until the sixteenth token
    assert allowed.any() and not (allowed & ~grammar_allows).any()
    for token in np.flatnonzero(allowed):
        said = tokenizer.decode([int(token)])
        assert said and (closes in said if closes == '"' else not said[0].isdigit()), said

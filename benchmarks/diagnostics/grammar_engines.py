"""Which grammar engine constrains decoding best here: llguidance or outlines-core (xgrammar
needs torch and triton, too heavy a dependency for a CLI). For the default model's tokenizer
and a few JSON schemas: compile time, then per token the time to compute the allowed-token
mask and advance the matcher along a valid answer; and whether each engine accepts the valid
answer and rejects a wrong one.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/diagnostics/grammar_engines.py [model folder]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

SCHEMAS = {
    "person": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                          "email": {"type": "string"}},
         "required": ["name", "age"]},
        {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com"},
        {"name": "Ada", "age": "36"},
    ),
    "weather_call": (
        {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]},
            "days": {"type": "integer", "minimum": 1, "maximum": 14}},
         "required": ["city", "unit"], "additionalProperties": False},
        {"city": "Paris", "unit": "celsius", "days": 3},
        {"city": "Paris", "unit": "kelvin"},
    ),
    "list": (
        {"type": "object", "properties": {"items": {"type": "array", "items": {
            "type": "object", "properties": {"title": {"type": "string"},
                                             "done": {"type": "boolean"}},
            "required": ["title", "done"]}}}, "required": ["items"]},
        {"items": [{"title": "buy milk", "done": False}, {"title": "write", "done": True}]},
        {"items": [{"title": "buy milk"}]},
    ),
}


def _token_bytes(tokenizer) -> list[bytes]:
    from mlx_lm.tokenizer_utils import _byte_decoder

    decoder = _byte_decoder()
    out = []
    for token in tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))):
        out.append(bytes(decoder[c] for c in token) if all(c in decoder for c in token)
                   else token.encode())
    return out


def llguidance_run(tokenizer, eos: int, schema: dict, good: list[int], bad: list[int]):
    import llguidance
    import llguidance.hf

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tokenizer, eos_token=eos)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(
        schema, defaults={"whitespace_flexible": False})
    matcher = llguidance.LLMatcher(lltok, grammar)
    compile_s = time.perf_counter() - t0
    mask = np.zeros((len(tokenizer) + 31) // 32, dtype=np.int32)
    per = []
    for token in good + [eos]:
        t0 = time.perf_counter()
        matcher.unsafe_compute_mask_ptr(mask.ctypes.data, mask.nbytes)
        allowed = (mask[token // 32] >> (token % 32)) & 1
        matcher.consume_token(token)
        per.append(time.perf_counter() - t0)
        if not allowed:
            return tok_s, compile_s, per, False, None
    accepted = not matcher.is_error()
    bad_matcher = llguidance.LLMatcher(lltok, grammar)
    rejects = bad_matcher.validate_tokens(bad + [eos]) < len(bad) + 1
    return tok_s, compile_s, per, accepted, rejects


def outlines_run(tokenizer, eos: int, schema: dict, good: list[int], bad: list[int]):
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    t0 = time.perf_counter()
    table: dict[bytes, list[int]] = {}
    for i, b in enumerate(_token_bytes(tokenizer)):
        if i != eos and i not in tokenizer.all_special_ids:
            table.setdefault(b, []).append(i)
    vocab = Vocabulary(eos, table)
    tok_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(schema), r"[ ]?"), vocab)
    compile_s = time.perf_counter() - t0
    guide = Guide(index)
    mask = np.zeros((len(tokenizer) + 31) // 32, dtype=np.int32)
    per = []
    for token in good + [eos]:
        t0 = time.perf_counter()
        guide.write_mask_into(mask.ctypes.data, mask.size, 4)
        allowed = (mask[token // 32] >> (token % 32)) & 1
        if token != eos:
            guide.advance(token)
        per.append(time.perf_counter() - t0)
        if not allowed:
            return tok_s, compile_s, per, False, None
    bad_guide = Guide(index)
    rejects = not bad_guide.accepts_tokens(bad) or not _finishes(bad_guide, bad)
    return tok_s, compile_s, per, True, rejects


def _finishes(guide, tokens) -> bool:
    for t in tokens:
        guide.advance(t)
    return guide.is_finished()


def main() -> None:
    from transformers import AutoTokenizer

    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else (
        Path.home() / ".local/share/mlxc/models/SmolLM2-135M-Instruct")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    print(f"tokenizer: {folder.name}, vocab {len(tokenizer)}")
    for engine, run in (("llguidance", llguidance_run), ("outlines-core", outlines_run)):
        for name, (schema, good, bad) in SCHEMAS.items():
            good_ids = tokenizer.encode(json.dumps(good, separators=(",", ":")))
            bad_ids = tokenizer.encode(json.dumps(bad, separators=(",", ":")))
            tok_s, compile_s, per, ok, rejects = run(tokenizer, eos, schema, good_ids, bad_ids)
            print(f"{engine:14s} {name:13s} tokenizer {tok_s*1e3:7.1f} ms  compile "
                  f"{compile_s*1e3:8.1f} ms  per token mean {np.mean(per)*1e6:7.1f} us "
                  f"max {np.max(per)*1e6:8.1f} us  accepts valid {ok}  rejects invalid {rejects}")


if __name__ == "__main__":
    main()

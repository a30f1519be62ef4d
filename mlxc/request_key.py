"""The response cache's key: SHA-256 of a request's canonical JSON, the same in every process
and on every machine. GenerationRequest (request.py) keys its pydantic dump with it; `mlxc ask`'s
cache-hit path builds a plain chat request's dump by hand (`chat_payload`): importing pydantic
costs that path more than all the rest. tests/test_request_key.py checks that the two agree.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

# Bump when the key's shape or the stored answer's meaning changes: old entries then miss.
SCHEMA_VERSION = 1
# Left out of the key at these defaults, so keys from before these fields existed stay the same.
KEYED_ONLY_WHEN_SET = {"logprobs": False, "top_logprobs": 0, "echo": False, "ignore_eos": False}


def canonical_json(payload: dict[str, Any], model_fingerprint: str) -> str:
    """`payload`: a GenerationRequest's `model_dump(mode="json")`."""
    body = {"schema": SCHEMA_VERSION, "model": model_fingerprint, **payload}
    for name, default in KEYED_ONLY_WHEN_SET.items():
        if body[name] == default:
            del body[name]
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def cache_key(payload: dict[str, Any], model_fingerprint: str) -> str:
    return hashlib.sha256(canonical_json(payload, model_fingerprint).encode()).hexdigest()


def chat_payload(messages: list[dict[str, str]], max_tokens: int, temperature: float,
                 top_p: float, seed: int | None) -> dict[str, Any]:
    """What `GenerationRequest(messages=messages, max_tokens=..., temperature=..., top_p=...,
    seed=...).model_dump(mode="json")` is for messages of role and text content, unvalidated:
    a request pydantic would refuse was never stored, so its key only misses."""
    return {
        "messages": [
            {"role": m["role"], "content": m["content"], "tool_calls": None,
             "tool_call_id": None, "name": None}
            for m in messages
        ],
        "prompt": None, "tools": None, "tool_choice": None, "response_format": None,
        "max_tokens": max_tokens, "temperature": float(temperature), "top_p": float(top_p),
        "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0, "presence_penalty": 0.0,
        "frequency_penalty": 0.0, "seed": seed, "stop": [],
        "logprobs": False, "top_logprobs": 0, "echo": False, "ignore_eos": False,
    }

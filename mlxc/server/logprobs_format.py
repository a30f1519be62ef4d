"""Log-probability entries (mlxc/engine/decode/logprobs.py) in the OpenAI APIs' shapes: chat's
`{"content": [...]}` and the legacy completions' parallel lists."""

from __future__ import annotations

from typing import Any


def _chat_item(e: dict) -> dict[str, Any]:
    return {"token": e["token"], "logprob": e["logprob"], "bytes": e["bytes"]}


def chat_logprobs(entries: list[dict] | None) -> dict[str, Any] | None:
    if entries is None:
        return None
    content = [
        {**_chat_item(e), "top_logprobs": [_chat_item(t) for t in e["top_logprobs"]]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion_logprobs(
    entries: list[dict] | None, top: int, offset: int = 0
) -> dict[str, Any] | None:
    """`tokens`, `token_logprobs`, `top_logprobs` (token -> logprob, None for a token with no
    context, the echoed prompt's first) and `text_offset` (characters from the text's start)."""
    if entries is None:
        return None
    tokens, offsets = [], []
    for e in entries:
        tokens.append(e["token"])
        offsets.append(offset)
        offset += len(e["token"])
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [
            None if e["logprob"] is None or not top
            else {t["token"]: t["logprob"] for t in e["top_logprobs"]}
            for e in entries
        ],
        "text_offset": offsets,
    }

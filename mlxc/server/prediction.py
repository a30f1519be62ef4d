"""OpenAI's Predicted Outputs on chat completions: `prediction: {"type": "content", "content":
str | [text parts]}` is a draft for speculative decoding (engine/decode/speculate.py), and
usage says how many of its tokens were accepted and rejected. It is honoured where the engine
can draft (greedy, or sampled without a seed; no grammar) and refused with a 400 naming it
elsewhere, as OpenAI refuses it with n > 1 and tools."""

from __future__ import annotations

from typing import Any

from mlxc.server.pipeline import refuse


def prediction_text(body: Any) -> str | None:
    """The prediction's text, or None without one; refuses a malformed one."""
    prediction = body.prediction
    if prediction is None:
        return None
    if not isinstance(prediction, dict) or prediction.get("type") != "content":
        raise refuse("prediction", 'prediction must be {"type": "content", "content": ...}')
    content = prediction.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text"
                   and isinstance(p.get("text"), str) for p in content):
            raise refuse("prediction", "prediction.content parts must be "
                         '{"type": "text", "text": ...}')
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise refuse("prediction", "prediction.content must be a string or text parts")
    return content


def check_prediction(request: Any, speculate: str) -> None:
    """Refuses a prediction the engine could not draft from (it would be ignored)."""
    if request.prediction is None:
        return
    why = None
    if speculate == "off":
        why = "while speculative decoding is off: start the server with --speculate auto"
    elif request.temperature > 0 and request.seed is not None:
        why = ("with a seed and temperature > 0 (a seeded answer is decoded without drafts, "
               "so that it does not change run to run): drop the seed or send temperature 0")
    elif request.tools:
        why = "with tools"
    elif request.response_format and request.response_format.get("type") != "text":
        why = "with response_format (a grammar constrains the answer)"
    if why:
        raise refuse("prediction", f"prediction cannot be used {why}")


def prediction_usage(turn: Any, answer: Any) -> dict[str, Any]:
    """`completion_tokens_details` of a request that sent a prediction (zeros on a hit:
    nothing was generated)."""
    hit = turn.call.reply.cached
    u = answer.usage
    return {"completion_tokens_details": {
        "reasoning_tokens": 0,
        "accepted_prediction_tokens": 0 if hit else u.accepted_prediction_tokens,
        "rejected_prediction_tokens": 0 if hit else u.rejected_prediction_tokens,
    }}

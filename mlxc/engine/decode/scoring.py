"""Log-probabilities of a prompt's own tokens (completions' `echo`, lm-eval's log-likelihood
requests): one forward pass over the prompt, in chunks through a fresh KV cache, and each
position's log-softmax read at the token that follows it. Engine thread only.

A fresh cache rather than the prefix cache's state: a stored state holds no logits, and
scoring needs every position's, so there is nothing to reuse."""

from __future__ import annotations

from typing import Any

from mlxc.engine.decode.logprobs import TokenNames, entry


def prompt_logprobs(
    model: Any, tokenizer: Any, tokens: list[int], top: int, step_size: int = 512
) -> list[dict]:
    """One entry per prompt token; the first has no context, so its logprob is None."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    names = TokenNames(tokenizer)
    text, raw = names(tokens[0])
    entries: list[dict] = [
        {"id": tokens[0], "token": text, "bytes": raw, "logprob": None, "top_logprobs": []}
    ]
    cache = make_prompt_cache(model)
    for start in range(0, len(tokens) - 1, step_size):
        chunk = tokens[start : start + step_size]
        following = tokens[start + 1 : start + 1 + len(chunk)]
        logits = model(mx.array(chunk)[None], cache=cache)[0, : len(following)]
        logits = logits.astype(mx.float32)
        rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        picked = mx.take_along_axis(rows, mx.array(following)[:, None], axis=-1)[:, 0]
        ids, values = _top_rows(rows, top)
        rows_out = zip(following, picked.tolist(), ids, values, strict=True)
        for token, logprob, row_ids, row_values in rows_out:
            top_k = list(zip(row_ids, row_values, strict=True))
            entries.append(entry(names, token, logprob, top_k))
        mx.clear_cache()
    return entries


def _top_rows(rows: Any, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """Each row's k most likely tokens, most likely first."""
    import mlx.core as mx

    if k <= 0:
        return [[]] * rows.shape[0], [[]] * rows.shape[0]
    k = min(k, rows.shape[-1])
    ids = mx.argpartition(-rows, k - 1, axis=-1)[:, :k]
    values = mx.take_along_axis(rows, ids, axis=-1)
    order = mx.argsort(-values, axis=-1)
    ids = mx.take_along_axis(ids, order, axis=-1)
    return ids.tolist(), mx.take_along_axis(values, order, axis=-1).tolist()

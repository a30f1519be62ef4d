"""Speculative rejection sampling for a sampled sequence (Leviathan et al., 2023, "Fast
Inference from Transformers via Speculative Decoding", algorithm 1; Chen et al., 2023).

mlxc's drafts (prompt lookup, Predicted Outputs) are fixed token runs: the draft distribution
q_i is a point mass on the drafted token d_i. The algorithm then reads: accept d_i with
probability min(1, p_i(d_i) / q_i(d_i)) = p_i(d_i); at the first rejection draw the token from
the residual norm(max(p_i - q_i, 0)), which is p_i with d_i removed and renormalised; when all
k are accepted draw a bonus token from p_{k+1}. Each emitted token is then distributed exactly
as p at its position: P(d) = p(d), and P(x != d) = (1 - p(d)) * p(x) / (1 - p(d)) = p(x).

p_i is the distribution the plain sampler draws from (`sampling_weights`): mlx-lm's
`make_sampler` filters (top-p, min-p, top-k, in its order, on the untempered
log-probabilities), then 1/temperature, as its `categorical_sampling`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def sampling_weights(temperature: float, top_p: float = 1.0, min_p: float = 0.0,
                     top_k: int = 0) -> Callable[[Any], Any]:
    """log-probabilities (..., vocab) -> the unnormalised log-weights mlx-lm's
    `make_sampler(temperature, top_p, min_p, top_k=top_k)` draws its token from."""
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    filters: list[Callable[[Any], Any]] = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p, 1))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))

    def weights(logprobs: Any) -> Any:
        for method in filters:
            logprobs = method(logprobs)
        return logprobs * (1.0 / temperature)

    return weights


def rejection_sample(weights: Any, draft: Any, key: Any = None) -> tuple[Any, Any]:
    """One verify pass's choice. `weights` (..., k+1, vocab): the target's log-weights after
    each of the k+1 fed positions (unnormalised is fine); `draft` (k,) or (..., k): the drafted
    tokens. Returns (accepted, token), each of shape (...): how many leading drafts are taken,
    and the token after them (the residual's draw, or the bonus when all k are taken). With k
    rows only (no bonus row), a run that takes all k has token -1: the caller goes on with the
    next positions. Leading dimensions are independent draws (the distribution test draws
    thousands in one call); without `key`, mlx's global generator, as the plain sampler."""
    import mlx.core as mx

    k = draft.shape[-1]
    batch, bonus = weights.shape[:-2], weights.shape[-2] > k
    draft = mx.broadcast_to(draft.astype(mx.int32), (*batch, k))[..., None]
    probs = mx.softmax(weights[..., :k, :].astype(mx.float32), axis=-1)
    p_draft = mx.take_along_axis(probs, draft, axis=-1)[..., 0]
    accept_key, draw_key = mx.random.split(key) if key is not None else (None, None)
    # u in [0, 1): a draft of probability 1 is always taken, one of probability 0 never
    taken = mx.random.uniform(shape=p_draft.shape, key=accept_key) < p_draft
    accepted = mx.cumprod(taken.astype(mx.int32), axis=-1).sum(axis=-1)
    # the residual at each drafted position (its draft removed); the bonus row as it is. A
    # residual with nothing left (p(d) = 1) is never drawn from: that draft is always taken.
    rows = mx.put_along_axis(weights[..., :k, :], draft,
                             mx.array(-float("inf"), weights.dtype), axis=-1)
    if bonus:
        rows = mx.concatenate([rows, weights[..., k:, :]], axis=-2)
    draws = mx.random.categorical(rows, axis=-1, key=draw_key).astype(mx.int32)
    if not bonus:
        draws = mx.concatenate([draws, mx.full((*batch, 1), -1, mx.int32)], axis=-1)
    token = mx.take_along_axis(draws, accepted[..., None], axis=-1)[..., 0]
    return accepted, token


def sample_run(logprobs: Any, draft: list[int], weights: Callable[[Any], Any]) -> tuple[int, int]:
    """The lone loop's choice over a verify pass's log-probability rows (k+1, vocab): (drafts
    taken, the token after them). The rows are filtered and decided in doubling chunks (1, 2,
    4, ... positions), each only once every draft before it was taken: top-p sorts the whole
    vocabulary, ~3 ms a row on a 2-core CPU (a plain step of SmolLM2-135M: ~80 ms), so the
    filters cost about what the plain path pays per emitted token rather than k+1 rows a
    pass. Each chunk is the algorithm above on its positions: the same distribution."""
    import mlx.core as mx

    k, start, size = len(draft), 0, 1
    while start < k:
        end = min(start + size, k + 1)  # rows start..end-1, with the bonus row once end > k
        accepted, token = rejection_sample(weights(logprobs[start:end]),
                                           mx.array(draft[start : min(end, k)]))
        accepted, token = accepted.item(), token.item()
        if token >= 0:
            return start + accepted, token
        start, size = end, size * 2
    return k, mx.random.categorical(weights(logprobs[k])).item()  # all taken: the bonus

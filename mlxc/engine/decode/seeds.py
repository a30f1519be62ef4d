"""Seeded sampling that holds inside a batch.

`mx.random.seed` sets one global generator: with several sequences in one batch, each draw
would depend on what the others drew before it, so a seeded request would change with its
neighbours. Instead each seeded sequence carries its own PRNG key, split once per sampled
token, and hands the sub-key to `mx.random.categorical`. The same seed therefore gives the
same draws alone or in any batch (given the same logits). The filters (top-p, min-p, top-k)
are mlx-lm's own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def keyed_sampler(
    seed: int, temperature: float, top_p: float = 0.0, min_p: float = 0.0, top_k: int = 0
) -> Callable[[Any], Any]:
    """A sampler like mlx-lm's `make_sampler`, drawing from its own key made from `seed`."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    filters: list[Callable[[Any], Any]] = []
    if 0 < top_p < 1.0:
        filters.append(lambda x: apply_top_p(x, top_p))
    if min_p != 0.0:
        filters.append(lambda x: apply_min_p(x, min_p, 1))
    if top_k > 0:
        filters.append(lambda x: apply_top_k(x, top_k))
    key = mx.random.key(seed % (1 << 64))  # any int the request allows

    def sample(logprobs: Any) -> Any:
        nonlocal key
        key, sub = mx.random.split(key)
        for method in filters:
            logprobs = method(logprobs)
        return mx.random.categorical(logprobs * (1.0 / temperature), key=sub)

    return sample

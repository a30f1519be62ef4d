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

    from mlxc.engine.decode.rejection import sampling_weights  # mlx-lm's filters, its order

    weights = sampling_weights(temperature, top_p, min_p, top_k)
    key = mx.random.key(seed % (1 << 64))  # any int the request allows

    def sample(logprobs: Any) -> Any:
        nonlocal key
        key, sub = mx.random.split(key)
        return mx.random.categorical(weights(logprobs), key=sub)

    return sample

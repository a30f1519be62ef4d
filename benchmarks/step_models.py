"""What the decode-step benchmarks share: a model loaded as they measure it, and caches
filled to a context, left-padded as mlx-lm's batch holds them."""

from __future__ import annotations

from typing import Any


def load_model(path: str, dequantize: bool = True) -> Any:
    """mlx-lm's model at `path`, its quantized layers dequantized to their scales' dtype
    (what mlxc's `--dtype auto` gives on CUDA)."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(path)
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        mx.eval(model.parameters())
    return model


def row_lengths(context: int, rows: int) -> list[int]:
    """Lengths around `context`, uneven as a batch's are, so rows are padded."""
    return [context - 17 * (i % 5) for i in range(rows)]


def lone_caches(model: Any) -> Any:
    """A cache maker (left paddings -> per-layer caches) of plain `KVCache`s."""
    from mlx_lm.models.cache import KVCache

    return lambda pads: [KVCache() for _ in model.layers]


def batch_caches(model: Any) -> Any:
    """A cache maker of mlx-lm's left-padded `BatchKVCache`s."""
    from mlx_lm.models.cache import BatchKVCache

    return lambda pads: [BatchKVCache(pads) for _ in model.layers]


def filled(model: Any, cache_of: Any, lengths: list[int]) -> list:
    """Caches from `cache_of` for len(lengths) sequences, row r holding lengths[r] tokens
    (left padded), evaluated."""
    import mlx.core as mx

    longest = max(lengths)
    caches = cache_of([longest - n for n in lengths])
    model(mx.array([[7] * longest for _ in lengths]), cache=caches)
    mx.eval([c.state for c in caches])
    return caches

"""Cutting a trimmable KV state into blocks and putting blocks back together (MLX).

Every layer kind here keeps its KV as arrays with the sequence on axis 2 ([batch, heads,
tokens, dim]): KVCache and ConcatenateKVCache as (keys, values), QuantizedKVCache as
(keys, scales, biases) for each of keys and values. A block is the flat list of every layer's
arrays for its tokens, copied out of the layer's preallocated buffer (a slice alone would keep
the whole buffer alive). Engine thread only.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from mlxc.engine.prefix_block_file import np_dtype


def leaves(layer: Any) -> list[Any]:
    keys, values = layer.keys, layer.values
    if isinstance(keys, (tuple, list)):
        return [*keys, *values]
    return [keys, values]


def cut(cache: list[Any], a: int, b: int) -> list[Any]:
    """Copies of tokens [a, b) of every layer, flat in layer order (not yet evaluated)."""
    # mx.array(x) copies: the block owns exactly its tokens, not the step-sized buffer.
    return [mx.array(x[..., a:b, :]) for layer in cache for x in leaves(layer)]


def nbytes(arrays: list[Any]) -> int:
    return sum(x.nbytes for x in arrays)


def kv_dtype(model: Any) -> str:
    """The dtype K/V are computed in: the first floating parameter's (weights may be quantized
    integers; their scales carry the compute dtype)."""
    from mlx.utils import tree_flatten

    for _, p in tree_flatten(model.parameters()):
        if mx.issubdtype(p.dtype, mx.floating):
            return str(p.dtype).removeprefix("mlx.core.")
    return "unknown"


def to_buffers(arrays: list[Any]) -> tuple[list[dict], list[memoryview]]:
    """Specs for a block file's header and zero-copy views of evaluated arrays (the writer
    thread reads them; it never calls MLX)."""
    specs, views, offset = [], [], 0
    for x in arrays:
        dtype = str(x.dtype).removeprefix("mlx.core.")
        raw = x.view(mx.uint16) if dtype == "bfloat16" else x
        view = memoryview(raw).cast("B")
        specs.append({"dtype": dtype, "shape": list(x.shape), "offset": offset,
                      "nbytes": view.nbytes})
        views.append(view)
        offset += view.nbytes
    return specs, views


def from_numpy(specs: list[dict], arrays: list[np.ndarray]) -> list[Any]:
    out = []
    for spec, x in zip(specs, arrays, strict=True):
        a = mx.array(x)
        if np_dtype(spec["dtype"]) is np.uint16 and spec["dtype"] == "bfloat16":
            a = a.view(mx.bfloat16)
        out.append(a)
    return out


def layer_width(layer: Any) -> int:
    """Arrays per layer in a block (2 plain, 6 quantized)."""
    return 6 if type(layer).__name__ == "QuantizedKVCache" else 2


def assemble(fresh: list[Any], pieces: list[list[Any]], lengths: list[int]) -> list[Any]:
    """Fill `fresh` (make_prompt_cache's layers) with the blocks' arrays, the first
    lengths[j] tokens of block j, joined along the sequence; returns it."""
    width = [layer_width(layer) for layer in fresh]
    n = sum(lengths)
    index = 0
    for layer, w in zip(fresh, width, strict=True):
        parts = []
        for i in range(index, index + w):
            arrays = [
                block[i] if block[i].shape[2] == k else block[i][..., :k, :]
                for block, k in zip(pieces, lengths, strict=True)
            ]
            joined = arrays[0] if len(arrays) == 1 else mx.concatenate(arrays, axis=2)
            parts.append(joined)
        index += w
        if w == 6:
            layer.keys, layer.values = tuple(parts[:3]), tuple(parts[3:])
        else:
            layer.keys, layer.values = parts
        layer.offset = n
    mx.eval([x for layer in fresh for x in leaves(layer)])
    return fresh

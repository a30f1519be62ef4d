"""Cutting a trimmable KV state into blocks and putting blocks back together (MLX).

Every layer kind here keeps its KV as arrays with the sequence on axis 2 ([batch, heads,
tokens, dim]): KVCache and ConcatenateKVCache as (keys, values), QuantizedKVCache as
(keys, scales, biases) for each of keys and values. A block is the flat list of every layer's
arrays for its tokens, copied out of the layer's preallocated buffer (a slice alone would keep
the whole buffer alive). Engine thread only.

With `prefix_disk_bits` 8, a block's floating arrays go to disk as MLX affine 8-bit (each as
its packed words, scales and biases; the first spec carries the recipe under "quant") and come
back dequantized to their dtype; the memory tier keeps full precision.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import numpy as np

from mlxc.engine.kv.block_file import np_dtype


def leaves(layer: Any) -> list[Any]:
    keys, values = layer.keys, layer.values
    if isinstance(keys, (tuple, list)):
        return [*keys, *values]
    return [keys, values]


def cut(cache: list[Any], a: int, b: int) -> list[Any]:
    """Copies of tokens [a, b) of every layer, flat in layer order (not yet evaluated)."""
    # A row-contiguous copy: the block owns exactly its tokens, not the step-sized buffer, and
    # its bytes can be written as they are. mx.array(x) alone does not copy: a prefill chunk
    # that fills a whole fresh buffer leaves the projection's transposed layout in the cache.
    return [mx.contiguous(x[..., a:b, :]) for layer in cache for x in leaves(layer)]


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


def group_size(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(group size, trailing axes a group runs over) to quantize an array of `shape`: within one
    token's head vector when a group fits it (head_dim 64, 128), else over one head's tokens,
    else over the heads too (the tiny model's head_dim 16, odd token counts); None if no group
    size divides it (then its block is written whole)."""
    n = 1
    for axes in (1, 2, 3):
        n *= shape[-axes]
        for size in (64, 32):
            if n % size == 0:
                return size, axes
    return None


def quantize(arrays: list[Any], bits: int) -> tuple[list[Any], list[dict | None]]:
    """(arrays to write, each one's dequantization recipe or None): every array of a block as
    (packed, scales, biases), the recipe on the packed one; or all of them as they are, if one
    cannot be (no group size divides it, or it is not floating). Not evaluated.

    All or none keeps each array at a multiple of its element size in the file (the reader
    views them in one buffer; a GPU cannot load a uint32 at an address 2 mod 4): the words are
    4-byte, and a 16-bit array's scales and biases together are a multiple of 4 bytes."""
    groups = [group_size(x.shape) if mx.issubdtype(x.dtype, mx.floating) else None
              for x in arrays]
    if not bits or None in groups:
        return list(arrays), [None] * len(arrays)
    out: list[Any] = []
    notes: list[dict | None] = []
    for x, (size, axes) in zip(arrays, groups, strict=True):
        flat = x.reshape(*x.shape[:-axes], -1) if axes > 1 else x
        out.extend(mx.quantize(flat, group_size=size, bits=bits))
        notes += [{"bits": bits, "group_size": size, "shape": list(x.shape),
                   "dtype": str(x.dtype).removeprefix("mlx.core.")}, None, None]
    return out, notes


def to_buffers(arrays: list[Any], notes: list[dict | None] | None = None,
               ) -> tuple[list[dict], list[memoryview]]:
    """Specs for a block file's header and zero-copy views of evaluated arrays (the writer
    thread reads them; it never calls MLX). `notes`: quantize's recipes, kept in the specs."""
    specs, views, offset = [], [], 0
    for i, x in enumerate(arrays):
        dtype = str(x.dtype).removeprefix("mlx.core.")
        raw = x.view(mx.uint16) if dtype == "bfloat16" else x
        view = memoryview(raw).cast("B")
        specs.append({"dtype": dtype, "shape": list(x.shape), "offset": offset,
                      "nbytes": view.nbytes})
        if notes and notes[i]:
            specs[-1]["quant"] = notes[i]
        views.append(view)
        offset += view.nbytes
    return specs, views


def blank(nbytes: int, stream: Any = None) -> Any:
    """An evaluated byte array to read a block file's arrays into, one per block (not one per
    array), zero-filled on `stream`: by default the default device's, so on a GPU the fill
    runs there and the host's reads then fault pages over on many threads. H200, the blocks
    of an 8,000-token 3B prefix (1.9 GB; benchmarks/diagnostics/block_load.py): zero-filled on the
    GPU, allocate 0.02 s + read 0.26 s; on the CPU, 0.80 s + 0.07 s (one thread touches every
    fresh page). Metal's memory is unified either way."""
    flat = mx.zeros((nbytes,), mx.uint8, stream=stream or mx.default_stream(mx.default_device()))
    mx.eval(flat)
    return flat


def byte_view(flat: Any) -> memoryview:
    """A writable view of an evaluated byte array's own memory (numpy shares it)."""
    return memoryview(np.asarray(flat))


def split(flat: Any, specs: list[dict]) -> list[Any]:
    """A block file's arrays (raw words for dtypes numpy lacks) as views of the bytes they
    were read into, once read."""
    return [
        flat[int(spec["offset"]) : int(spec["offset"]) + int(spec["nbytes"])]
        .view(getattr(mx, np.dtype(np_dtype(spec["dtype"])).name))
        .reshape(spec["shape"])
        for spec in specs
    ]


def _mx(spec: dict, x: Any) -> Any:
    a = x if isinstance(x, mx.array) else mx.array(x)
    if np_dtype(spec["dtype"]) is np.uint16 and spec["dtype"] == "bfloat16":
        a = a.view(mx.bfloat16)
    return a


def from_file(specs: list[dict], arrays: list[Any]) -> list[Any]:
    """MLX arrays of a block file's arrays (numpy, or `split`'s), quantized ones
    dequantized to their dtype (either format, whatever this process's setting). ValueError if
    a recipe does not fit its data."""
    if len(specs) != len(arrays):
        raise ValueError("specs and arrays disagree")
    out, i = [], 0
    while i < len(specs):
        recipe = specs[i].get("quant")
        if recipe is None:
            out.append(_mx(specs[i], arrays[i]))
            i += 1
            continue
        if i + 3 > len(specs):
            raise ValueError("a quantized array without its scales and biases")
        try:
            packed, scales, biases = (_mx(specs[j], arrays[j]) for j in range(i, i + 3))
            dtype = getattr(mx, recipe["dtype"])
            if not isinstance(dtype, mx.Dtype) or not mx.issubdtype(dtype, mx.floating):
                raise ValueError(f"not a floating dtype: {recipe['dtype']}")
            x = mx.dequantize(packed, scales, biases, group_size=int(recipe["group_size"]),
                              bits=int(recipe["bits"]))
            out.append(x.reshape([int(n) for n in recipe["shape"]]).astype(dtype))
        except (KeyError, TypeError, AttributeError, RuntimeError) as exc:
            raise ValueError(f"bad quantized array ({exc})") from exc
        i += 3
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

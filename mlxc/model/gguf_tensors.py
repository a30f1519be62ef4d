"""Reading a GGUF file's tensors and metadata, with each quantization type decoded by a reader
known to be right for it.

`mx.load` keeps Q4_0/Q4_1/Q8_0 packed (MLX's own affine format, no memory lost) and reads
F16/F32, but K-quants came out wrong from it (Q4_K: relative error up to 0.96 against the
`gguf` package's reference dequantization) and files with Q5_0/Q5_1/Q2_K... fail to load at
all. So a file whose tensors are all of MLX's exact types goes through `mx.load`; any other
goes through the `gguf` package (llama.cpp's own Python reader): the types that are MLX affine
quantization in another byte order (Q4_K, Q5_K, Q5_0, Q5_1 and the three above) are repacked
into MLX's layout (gguf_pack.py), every other type it has a dequantizer for (Q2_K, Q3_K, Q6_K,
i-quants, ternary, MXFP4/NVFP4) is dequantized with its reference code. Types neither reads
are refused by name.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from mlxc.model.gguf_pack import BITS

MLX_EXACT = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}  # what mx.load reads right
PACKED = set(BITS)  # kept quantized, in MLX's layout


def _dequantizable() -> set[str]:
    try:
        from gguf.quants import _type_traits  # the types gguf.quants.dequantize decodes
    except ImportError:  # an older gguf package: the types it has had since 0.10
        return {"BF16", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}
    return {t.name for t in _type_traits} - MLX_EXACT - PACKED


# What the gguf package dequantizes and tests/test_gguf_quants.py checks against it.
DEQUANTIZED = _dequantizable()
IMPORTED = MLX_EXACT | PACKED | DEQUANTIZED
# Bytes a value takes once converted: MLX's packed words plus a float16 scale and bias per 32;
# the rest float16 (bfloat16 for BF16).
_CONVERTED = {"F32": 4.0, "F16": 2.0, **{k: (b + 1) / 8 for k, b in BITS.items()}}


class UnsupportedQuantization(ValueError):
    pass


def tensor_types(header: Any) -> dict[str, str]:
    """Tensor name -> GGML type name (F16, Q4_K ...), from a gguf_header.GGUFHeader."""
    from mlxc.model.gguf_header import type_name

    return {name: type_name(kind) for name, (_shape, kind, _off) in header.tensors.items()}


def converted_bytes(header: Any) -> int:
    """About how many bytes the converted weights take: packed where MLX keeps the type,
    float16 (bfloat16 for BF16) where it is dequantized."""
    types = tensor_types(header)
    total = 0
    for name, (shape, _kind, _off) in header.tensors.items():
        count = 1
        for d in shape:
            count *= d
        total += int(count * _CONVERTED.get(types[name], 2.0))
    return total


def needs_gguf_reader(types: dict[str, str]) -> bool:
    if unknown := sorted({t for t in types.values() if t not in IMPORTED}):
        raise UnsupportedQuantization(
            f"its tensors use {', '.join(unknown)}, which mlxc cannot import exactly (it reads "
            f"{', '.join(sorted(IMPORTED))}); pick another quantization of the model"
        )
    return any(t not in MLX_EXACT for t in types.values())


def read_with_gguf(
    path: Path, say: Callable[[str], None] = lambda _msg: None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors as mx arrays, metadata as Python values) through the gguf package: float
    tensors keep their type, PACKED ones become MLX's weight/scales/biases, the others are
    dequantized to float16 (values a K-quant block can hold fit it), BF16 to bfloat16
    (float16's range is too small for it)."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    from mlxc.model.gguf_pack import repack

    reader = GGUFReader(str(path))
    total = sum(int(t.n_bytes) for t in reader.tensors)
    done, told = 0, -1
    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists the innermost first
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            tensors[t.name] = mx.array(np.array(t.data).reshape(shape))
        elif kind.name in PACKED:
            weight, scales, biases = repack(t.data, kind.name, shape)
            base = t.name.removesuffix(".weight")
            tensors[t.name] = mx.array(weight)
            tensors[f"{base}.scales"], tensors[f"{base}.biases"] = mx.array(scales), mx.array(
                biases)
        elif kind == GGMLQuantizationType.BF16:
            values = dequantize(t.data, kind).reshape(shape)
            tensors[t.name] = mx.array(values).astype(mx.bfloat16)
        else:  # float16 holds what a block can, unless its scales run past float16's range
            values = dequantize(t.data, kind).reshape(shape)
            wide = values.size and np.abs(values).max() > np.finfo(np.float16).max
            tensors[t.name] = mx.array(values).astype(mx.bfloat16 if wide else mx.float16)
        done += int(t.n_bytes)
        if (percent := done * 100 // max(total, 1)) >= told + 5:  # every 5%
            told = percent
            say(f"reading weights {done / 1e9:.1f} / {total / 1e9:.1f} GB")
    return tensors, metadata(reader)


def metadata(reader: Any) -> dict[str, Any]:
    """Key -> value; arrays of numbers as numpy arrays (as `mx.load` hands them: with
    `.tolist()`), arrays of strings as lists."""
    import numpy as np

    meta = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        value = field.contents()
        if isinstance(value, list) and value and not isinstance(value[0], str):
            value = np.array(value)
        meta[name] = value
    return meta

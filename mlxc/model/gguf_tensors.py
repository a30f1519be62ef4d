"""Reading a GGUF file's tensors and metadata, with each quantization type decoded by a reader
known to be right for it.

`mx.load` keeps Q4_0/Q4_1/Q8_0 packed (MLX's own affine format, no memory lost) and reads
F16/F32, but K-quants came out wrong from it (Q4_K: relative error up to 0.96 against the
`gguf` package's reference dequantization) and files with Q5_0/Q5_1/Q2_K... fail to load at
all. So a file whose tensors are all of MLX's exact types goes through `mx.load`; any other
goes through the `gguf` package (llama.cpp's own Python reader), which dequantizes every
quantized tensor to float16 with its reference code. Types neither reads are refused by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

MLX_EXACT = {"F32", "F16", "Q4_0", "Q4_1", "Q8_0"}
# What the gguf package dequantizes and tests/test_gguf_quants.py checks against it.
DEQUANTIZED = {"BF16", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


class UnsupportedQuantization(ValueError):
    pass


def tensor_types(path: Path) -> dict[str, str]:
    """Tensor name -> GGML type name (F16, Q4_K ...), from the header only (memory-mapped)."""
    from gguf import GGUFReader

    return {t.name: t.tensor_type.name for t in GGUFReader(str(path)).tensors}


def needs_gguf_reader(types: dict[str, str]) -> bool:
    unknown = sorted({t for t in types.values() if t not in MLX_EXACT | DEQUANTIZED})
    if unknown:
        raise UnsupportedQuantization(
            f"its tensors use {', '.join(unknown)}, which mlxc cannot import exactly (it reads "
            f"{', '.join(sorted(MLX_EXACT | DEQUANTIZED))}); pick another quantization of the "
            "model"
        )
    return any(t not in MLX_EXACT for t in types.values())


def read_with_gguf(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensors as mx arrays, metadata as Python values) through the gguf package: float
    tensors keep their type, quantized ones are dequantized to float16 (values a K-quant
    block can hold fit it)."""
    import mlx.core as mx
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(str(path))
    tensors = {}
    for t in reader.tensors:
        kind = t.tensor_type
        shape = [int(d) for d in reversed(t.shape)]  # GGUF lists the innermost first
        if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            tensors[t.name] = mx.array(np.array(t.data).reshape(shape))
        elif kind == GGMLQuantizationType.BF16:  # float16's range is too small for it
            values = dequantize(t.data, kind).reshape(shape)
            tensors[t.name] = mx.array(values).astype(mx.bfloat16)
        else:
            tensors[t.name] = mx.array(dequantize(t.data, kind).astype(np.float16).reshape(shape))
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

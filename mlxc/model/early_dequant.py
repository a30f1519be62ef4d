"""A quantized MLX folder's dequantized weights, computed from its files with mlx.core alone.

The engine runs this while another thread imports mlx-lm: that import pulls in transformers
(~0.8 s of Python on the 2-core CPU, and no mlx-lm module can be imported without it, since
mlx_lm/__init__.py imports its tokenizer code). MLX's evaluation releases the GIL, so the
import and the dequantization share the two cores instead of queueing. The values are those
apply_dtype computes itself (the same `_affine_dequantize` on the same arrays); it takes one
only for a layer whose bits, group size and packed shape match the file's."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Dequantized:
    weight: Any  # mx.array in the target dtype, evaluated
    bits: int
    group_size: int
    packed_shape: tuple[int, ...]


def dequantize_files(folder: Path, dtype: str) -> dict[str, Dequantized] | None:
    """Module path -> its dequantized weight, for every affine 2/4/8-bit layer of `folder`'s
    safetensors; None where apply_dtype has nothing to dequantize this way (another dtype,
    no `quantization` in config.json, another mode)."""
    if dtype not in DTYPES:
        return None
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return None  # mlx-lm's own load names the problem
    quantization = config.get("quantization")
    if not isinstance(quantization, dict) or "quantization_config" in config or (
            quantization.get("mode", "affine") != "affine"):
        return None
    files = sorted(Path(folder).glob("model*.safetensors"))
    if not files:
        return None
    import mlx.core as mx

    from mlxc.model.dtype import _affine_dequantize

    weights: dict = {}
    for file in files:
        weights.update(mx.load(str(file)))
    target = getattr(mx, dtype)
    out = {}
    for key, packed in weights.items():
        module = key.removesuffix(".weight")
        scales, biases = weights.get(f"{module}.scales"), weights.get(f"{module}.biases")
        setting = quantization.get(module, quantization)
        if key == module or scales is None or biases is None or not isinstance(setting, dict):
            continue
        group = int(setting.get("group_size", quantization.get("group_size", 64)))
        bits = int(setting.get("bits", quantization.get("bits", 4)))
        if bits not in (2, 4, 8) or setting.get("mode", "affine") != "affine" or (
                packed.shape[-1] * 32 != scales.shape[-1] * group * bits):
            continue
        w = _affine_dequantize(mx, packed, scales.astype(mx.float32),
                               biases.astype(mx.float32), group, bits)
        out[module] = Dequantized(w.astype(target), bits, group, tuple(packed.shape))
    mx.eval([d.weight for d in out.values()])  # one evaluation: the GIL is free meanwhile
    return out

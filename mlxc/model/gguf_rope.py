"""Llama 3's rope scaling as llama.cpp stores it. convert_hf_to_gguf.py turns the config's
`rope_scaling` {rope_type: llama3, factor, low_freq_factor, high_freq_factor,
original_max_position_embeddings} into the tensor `rope_freqs.weight`: one divisor per rotated
pair, by which llama.cpp's rope divides that pair's frequency. No GGUF metadata key holds the
parameters, so they are found back from the tensor (the Llama 3.1-3.3 defaults first, else
fitted to its smoothly scaled pairs) and kept only when llama.cpp's own formula gives the very
tensor back and mlx-lm's Llama3RoPE rotates by the very periods llama.cpp would. mlx-lm has no
rope that takes arbitrary divisors, so any other tensor is refused by name."""

from __future__ import annotations

import math

import numpy as np

LLAMA31 = (1.0, 4.0, 8192)  # low_freq_factor, high_freq_factor, original context (Llama 3.1-3.3)
RTOL = 1e-5  # the file's float32 arithmetic against ours


def llama_cpp_factors(base: float, dim: int, factor: float, low: float, high: float,
                      original: float) -> np.ndarray:
    """rope_freqs.weight as convert_hf_to_gguf.py computes it from llama3 parameters."""
    freqs = 1.0 / (np.float32(base) ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    wavelen = 2 * math.pi / freqs.astype(np.float64)
    smooth = (original / wavelen - low) / (high - low)
    scaled = np.where(wavelen > original / low, factor, 1 / ((1 - smooth) / factor + smooth))
    return np.where(wavelen < original / high, 1.0, scaled).astype(np.float32)


def _rounded(value: float) -> float | int:
    """A fitted parameter as the round number it was (4.0, 8192), within the fit's error."""
    for digits in range(1, 7):
        near = float(f"{value:.{digits}g}")
        if abs(near - value) <= 1e-4 * abs(value):
            return int(near) if near.is_integer() else near
    return value


def llama3_scaling(factors, base: float, dim: int) -> dict | None:
    """mlx-lm's rope_scaling for `factors` (rope_freqs.weight) of a head rotating `dim` values
    at `base`; {} when every factor is 1 (nothing scaled); None when no llama3 parameters give
    these factors."""
    r = np.asarray(factors, np.float64).reshape(-1)
    if r.size != dim // 2 or not np.all(np.isfinite(r)) or r.min() <= 0:
        return None
    if np.all(r == 1.0):
        return {}
    factor = float(r.max())
    candidates = [LLAMA31]
    freqs = 1.0 / (float(base) ** (np.arange(0, dim, 2) / dim))
    wavelen = 2 * math.pi / freqs
    middle = (r > 1 + RTOL) & (r < factor * (1 - RTOL))
    if factor > 1 and middle.sum() >= 2:
        # There r = 1 / ((1 - s) / factor + s) with s = (L / wavelen - low) / (high - low),
        # a line in 1 / wavelen. The tensor fixes only L / low and L / high: take low = 1.
        s = (1 / r[middle] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[middle], s, 1)
        if intercept < 0:
            candidates.append((1.0, _rounded(1 - 1 / intercept), _rounded(-slope / intercept)))
    for low, high, original in candidates:
        if high > low and np.allclose(llama_cpp_factors(base, dim, factor, low, high, original),
                                      r, rtol=RTOL, atol=0):
            return {"rope_type": "llama3", "factor": _rounded(factor) * 1.0,
                    "low_freq_factor": float(low), "high_freq_factor": float(high),
                    "original_max_position_embeddings": original}
    return None


def rotates_as_llama_cpp(scaling: dict, factors, base: float, dim: int) -> bool:
    """Whether mlx-lm's Llama3RoPE with `scaling` turns each pair by the period llama.cpp's rope
    gives it with `factors`: base ** (2i / dim) * factor_i."""
    from mlx_lm.models.rope_utils import Llama3RoPE

    theirs = np.asarray(factors, np.float64).reshape(-1) * (
        float(base) ** (np.arange(0, dim, 2) / dim))
    rope = Llama3RoPE(dim, base=base, scaling_config=scaling)
    return bool(np.allclose(np.array(rope._freqs), theirs, rtol=RTOL, atol=0))


def read_factors(header) -> np.ndarray | None:
    """rope_freqs.weight's values straight from the file (a few dozen float32s), for a
    header-only look (describe.py); None when the tensor is not a plain F32 vector."""
    shape, kind, offset = header.tensors["rope_freqs.weight"]
    if kind != 0 or len(shape) != 1:  # GGML type 0: F32
        return None
    with open(header.path, "rb") as f:
        f.seek(header.data_start + offset)
        values = np.frombuffer(f.read(4 * shape[0]), "<f4")
    return values if values.size == shape[0] else None


def rope_freqs_problem(header) -> str | None:
    """Why the import would refuse this header's rope_freqs.weight (None: it would not)."""
    meta = header.metadata
    if meta.get("general.architecture") != "llama" or meta.get("llama.expert_count"):
        return "rope_freqs.weight is read only for Llama 3 (the llama architecture)"
    heads = int(meta.get("llama.attention.head_count") or 1)
    dim = int(meta.get("llama.attention.key_length")
              or int(meta.get("llama.embedding_length") or 0) // heads)
    factors = read_factors(header)
    if factors is None or llama3_scaling(factors, meta.get("llama.rope.freq_base", 10000.0),
                                         dim) is None:
        return "rope_freqs.weight matches no Llama 3 rope scaling"
    return None

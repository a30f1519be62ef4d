"""GGUF quantization types that are MLX affine quantization in another byte order, repacked
into MLX's layout without losing a bit: a value is scale * q + bias with one scale and bias per
32 values and q an unsigned integer of 4, 5 or 8 bits.

    Q4_0  d * (q - 8)            Q4_1  d * q + m          Q8_0  d * q (q signed)
    Q5_0  d * (q - 16)           Q5_1  d * q + m
    Q4_K  d * sc * q - dmin * m, 8 sub-blocks of 32 with 6-bit sc and m (Q5_K: 5-bit q)

Q2_K, Q3_K and Q6_K scale blocks of 16 values, which MLX's groups (32, 64, 128) cannot hold:
those are dequantized (gguf_tensors.py). Scales and biases are float16, as `mx.load` gives
Q4_0's: d * sc rounds to float16's 11 bits, within 1e-3 of the largest value of its group."""

from __future__ import annotations

import numpy as np

GROUP = 32
QK_K = 256
BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8, "Q5_0": 5, "Q5_1": 5, "Q4_K": 4, "Q5_K": 5}


def _f16(raw: np.ndarray) -> np.ndarray:
    return raw.copy().view(np.float16).astype(np.float32)  # [n, 2] bytes -> [n, 1]


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32]: low nibbles are values 0-15, high nibbles 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _high_bits(qh: np.ndarray, count: int) -> np.ndarray:
    """[n, count / 8] bytes -> [n, count] bits, bit i of the little-endian stream is value i."""
    return np.unpackbits(qh, axis=-1, bitorder="little")[:, :count]


def _legacy(raw: np.ndarray, kind: str):
    """Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks of 32: (q [n, 32], scale [n, 1], bias [n, 1])."""
    d = _f16(raw[:, :2])
    if kind == "Q8_0":
        q = raw[:, 2:].view(np.int8).astype(np.int16) + 128
        return q.astype(np.uint8), d, -128 * d
    offset = 4 if kind in ("Q4_1", "Q5_1") else 2
    m = _f16(raw[:, 2:4]) if offset == 4 else None
    if kind.startswith("Q5"):
        q = _nibbles(raw[:, offset + 4:]) | (_high_bits(raw[:, offset:offset + 4], 32) << 4)
        zero = 16
    else:
        q, zero = _nibbles(raw[:, offset:]), 8
    return q, d, (m if m is not None else -zero * d)


def _k_quant(raw: np.ndarray, kind: str):
    """Q4_K/Q5_K super-blocks of 256: (q [n, 256], scale [n, 8], bias [n, 8])."""
    from gguf.quants import Q4_K

    n = raw.shape[0]
    d, dmin = _f16(raw[:, 0:2]), _f16(raw[:, 2:4])
    sc, m = Q4_K.get_scale_min(raw[:, 4:16])
    rest = raw[:, 16:]
    if kind == "Q5_K":
        qh, rest = rest[:, :32], rest[:, 32:]
    # 4 chunks of 64 values: 32 bytes, low nibbles the first 32 values, high nibbles the next.
    qs = rest.reshape(n, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, QK_K)
    if kind == "Q5_K":  # bit j of qh byte i is the high bit of value 32 j + i
        bits = (qh.reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
        q = q | (bits.reshape(n, QK_K) << 4)
    return q, d * sc.astype(np.float32), -dmin * m.astype(np.float32)


def _pack(q: np.ndarray, bits: int) -> np.ndarray:
    """[rows, cols] small integers -> MLX's [rows, cols * bits / 32] uint32 words: value i in
    bits [bits * i, bits * i + bits) of the row's little-endian bit stream."""
    rows, cols = q.shape
    eight = q.reshape(rows, cols // 8, 8).astype(np.uint64)
    words = np.zeros((rows, cols // 8), np.uint64)
    for i in range(8):
        words |= eight[:, :, i] << np.uint64(bits * i)
    stream = words.view(np.uint8).reshape(rows, cols // 8, 8)[:, :, :bits]  # little-endian
    return np.ascontiguousarray(stream).reshape(rows, -1).view(np.uint32)


def repack(raw: np.ndarray, kind: str, shape: list[int]):
    """A GGUF tensor's bytes -> (weight uint32, scales float16, biases float16) for MLX, the
    weight [..., in * bits / 32] and scales/biases [..., in / 32] over the outer dims `shape`.
    Done a few million values at a time: an expert stack holds hundreds of millions."""
    block = QK_K if kind.endswith("_K") else GROUP
    cols, rows = shape[-1], int(np.prod(shape[:-1]))
    raw = np.ascontiguousarray(raw).reshape(rows, -1)
    step = max(1, (1 << 22) // cols)
    weight = np.empty((rows, cols * BITS[kind] // 32), np.uint32)
    scales = np.empty((rows, cols // GROUP), np.float16)
    biases = np.empty_like(scales)
    for start in range(0, rows, step):
        part = raw[start:start + step]
        n = part.shape[0]
        q, scale, bias = (_k_quant if block == QK_K else _legacy)(
            part.reshape(n * cols // block, -1), kind)
        weight[start:start + n] = _pack(q.reshape(n, cols), BITS[kind])
        scales[start:start + n] = scale.reshape(n, -1)
        biases[start:start + n] = bias.reshape(n, -1)
    groups = [*shape[:-1], cols // GROUP]
    return weight.reshape(*shape[:-1], -1), scales.reshape(groups), biases.reshape(groups)

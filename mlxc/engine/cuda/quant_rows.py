"""A quantized projection of a few rows at once (1..MAX_ROWS), for decoding on CUDA.

A decode step multiplies a few rows (one per sequence, or a speculative verify's k+1 per
sequence) by each packed weight. On MLX 0.32.4's CUDA backend `quantized_matmul` slows down
past 4 rows (H200, 3B shape: 4-bit 276 tok/s at batch 4, 159 at 8, see model/dtype.py), which
is why `--dtype auto` used to dequantize. This kernel reads each packed weight once for all the
rows: a block takes FEATURES output features, its threads split the input features in chunks of
LOADW 32-bit words (8 values a word in 4 bits, 4 in 8; one 16-byte load at LOADW 4), and per
8 values it adds scale * (q . x) + bias * sum(x) for every row, in float32.

MLX's affine layout (`mx.quantize`): a row of K values packs into K*bits/32 uint32 words, value
j of a word in bits [bits*j, bits*(j+1)), lowest first; one scale and one bias per group of
`group_size` values along K. `install` swaps the class of the model's QuantizedLinear layers
(and a tied head's QuantizedEmbedding) on CUDA only, with MLXC_QUANT_KERNEL=1 (off by default
until measured on a GPU: see `enabled`).
Prompt chunks of LONG_ROWS rows or more go through `dequantized_matmul` instead.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Any

MAX_ROWS = 16  # a speculative verify of 4 sequences x 4 tokens at the most
ROW_BUCKETS = (1, 2, 4, 8, 16)  # rows are a run-time bound under a compiled per-bucket cap
GROUPS = (32, 64, 128)
BITS = (4, 8)
# (outputs a block computes, warps splitting K, uint32 words a thread loads per weight row), by
# bits and row bucket. 4 bits: the fastest of 7 shapes on an H100, 8 Dec 2026 (`gpu_decode.py
# --parts kernels`, docs/performance.md); 8 bits: not yet timed past 2 rows, so the first form's.
# Each x chunk a thread loads serves FEATURES weights.
BLOCKS = {4: {1: (8, 4, 4), 2: (4, 2, 4), 4: (2, 4, 4), 8: (4, 4, 2), 16: (4, 4, 1)},
          8: dict.fromkeys(ROW_BUCKETS, (4, 4, 1))}
# MLXC_QUANT_BLOCKS="1:8x4x4,16:2x4" overrides some, for both widths (for benchmarks)
for _part in filter(None, os.environ.get("MLXC_QUANT_BLOCKS", "").split(",")):
    _rows, _, _shape = _part.partition(":")
    for _table in BLOCKS.values():
        _table[int(_rows)] = tuple(int(v) for v in _shape.split("x"))
ENV = "MLXC_QUANT_KERNEL"
# Fewer rows than this stay MLX's: its one-row kernel is faster than this one (H100, 3B 4-bit,
# 8 Dec: 4 layers' projections 0.477 against 0.547 ms at best; one stream 274 tok/s with one row
# left to MLX against 209 without); benchmarks/gpu_decode.py times both.
MIN_ROWS = int(os.environ.get("MLXC_QUANT_MIN_ROWS", "2"))
# Chunks of at least this many rows (a prompt's) dequantize the weight and run one GEMM; to be
# set by measurement (benchmarks/gpu_decode.py --long-rows); between, MLX's quantized matmul.
LONG_ROWS = int(os.environ.get("MLXC_QUANT_LONG_ROWS", "256"))

_SOURCE = """
    // LOADW uint32 words of one weight row per load (16 bytes at 4: more bytes in flight
    // per thread), taken apart in pieces of 8 values (one word in 4 bits, two in 8).
    constexpr int PER_WORD = 32 / BITS;
    constexpr unsigned MASK = (1u << BITS) - 1u;
    constexpr int PIECE_WORDS = BITS / 4;      // words holding 8 values
    constexpr int PIECES = LOADW / PIECE_WORDS;
    constexpr int VALS = 8 * PIECES;           // values a thread takes at once
    constexpr int XLOADS = 8 * sizeof(T) / 16; // 16-byte loads for 8 values of x
    const int tid = threadIdx.x;
    const int lane = tid % 32, warp = tid / 32;
    const int M = x_shape[0];
    const int K = x_shape[1];
    const int N = scales_shape[0];
    const int G = K / GROUP;
    const int chunks = K / VALS;
    const int n0 = blockIdx.x * FEATURES;
    float acc[FEATURES][MAXM];
    #pragma unroll
    for (int f = 0; f < FEATURES; ++f)
        #pragma unroll
        for (int m = 0; m < MAXM; ++m) acc[f][m] = 0.0f;
    const uint32_t* wrow[FEATURES];
    const S* srow[FEATURES];
    const S* brow[FEATURES];
    #pragma unroll
    for (int f = 0; f < FEATURES; ++f) {  // past N (a partial last block): row N-1, unused
        const size_t n = (size_t)min(n0 + f, N - 1);
        wrow[f] = w + n * (K / PER_WORD);
        srow[f] = scales + n * G;
        brow[f] = biases + n * G;
    }
    for (int c = tid; c < chunks; c += WARPS * 32) {
        const int g = (c * VALS) / GROUP;      // VALS divides GROUP: one group a chunk
        uint32_t word[FEATURES][LOADW];
        float s[FEATURES], b[FEATURES];
        #pragma unroll
        for (int f = 0; f < FEATURES; ++f) {
            if (LOADW == 4) {
                const uint4 v = reinterpret_cast<const uint4*>(wrow[f])[c];
                word[f][0] = v.x; word[f][1 % LOADW] = v.y;
                word[f][2 % LOADW] = v.z; word[f][3 % LOADW] = v.w;
            } else if (LOADW == 2) {
                const uint2 v = reinterpret_cast<const uint2*>(wrow[f])[c];
                word[f][0] = v.x; word[f][1 % LOADW] = v.y;
            } else {
                word[f][0] = wrow[f][c];
            }
            s[f] = static_cast<float>(srow[f][g]);
            b[f] = static_cast<float>(brow[f][g]);
        }
        #pragma unroll
        for (int p = 0; p < PIECES; ++p) {
            float q[FEATURES][8];
            #pragma unroll
            for (int f = 0; f < FEATURES; ++f)
                #pragma unroll
                for (int i = 0; i < 8; ++i)
                    q[f][i] = static_cast<float>(
                        (word[f][p * PIECE_WORDS + i / PER_WORD] >> (BITS * (i % PER_WORD)))
                        & MASK);
            #pragma unroll
            for (int m = 0; m < MAXM; ++m) {
                if (m < M) {
                    const uint4* xp = reinterpret_cast<const uint4*>(
                        x + (size_t)m * K + (size_t)c * VALS + p * 8);
                    uint4 xv[XLOADS];
                    #pragma unroll
                    for (int l = 0; l < XLOADS; ++l) xv[l] = xp[l];
                    const T* xt = reinterpret_cast<const T*>(xv);
                    float xf[8];
                    float xsum = 0.0f;
                    #pragma unroll
                    for (int i = 0; i < 8; ++i) {
                        xf[i] = static_cast<float>(xt[i]);
                        xsum += xf[i];
                    }
                    #pragma unroll
                    for (int f = 0; f < FEATURES; ++f) {
                        float dot = 0.0f;
                        #pragma unroll
                        for (int i = 0; i < 8; ++i) dot += q[f][i] * xf[i];
                        acc[f][m] += s[f] * dot + b[f] * xsum;
                    }
                }
            }
        }
    }
    __shared__ float partial[WARPS][FEATURES][MAXM];
    #pragma unroll
    for (int f = 0; f < FEATURES; ++f) {
        #pragma unroll
        for (int m = 0; m < MAXM; ++m) {
            if (m < M) {
                float v = acc[f][m];
                #pragma unroll
                for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffff, v, off);
                if (lane == 0) partial[warp][f][m] = v;
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < FEATURES * M; i += WARPS * 32) {
        const int f = i / M, m = i % M, n = n0 + f;
        if (n < N) {
            float v = 0.0f;
            #pragma unroll
            for (int k = 0; k < WARPS; ++k) v += partial[k][f][m];
            out[(size_t)m * N + n] = static_cast<T>(v);
        }
    }
"""


def enabled() -> bool:
    """The switch: MLXC_QUANT_KERNEL=1 routes quantized layers to the kernel; 0 (the default
    until tests/test_quant_kernels.py and benchmarks/gpu_decode.py have run on a GPU) keeps
    MLX's quantized matmul."""
    return os.environ.get(ENV, "0").strip().lower() in ("1", "on", "true", "yes")


def usable() -> bool:
    """Whether this process runs MLX on CUDA (the only backend the kernel is for)."""
    from mlxc.engine.cuda import small_rows

    return small_rows.usable()


@cache
def _kernel() -> Any:
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name="mlxc_quant_rows", input_names=["x", "w", "scales", "biases"],
        output_names=["out"], source=_SOURCE)


@cache
def _launch(dtype: Any, scales_dtype: Any, outputs: int, bits: int, group: int, bucket: int,
            features: int, warps: int, words: int) -> dict:
    """The kernel call's fixed arguments (built once per shape: a step makes ~200 calls, and
    the host sets a lone step's pace)."""
    blocks = -(-outputs // features)
    return {"template": [("T", dtype), ("S", scales_dtype), ("BITS", bits), ("GROUP", group),
                         ("MAXM", bucket), ("FEATURES", features), ("WARPS", warps),
                         ("LOADW", words)],
            "grid": (blocks * warps * 32, 1, 1), "threadgroup": (warps * 32, 1, 1),
            "output_dtypes": [dtype]}


def bucket(rows: int) -> int:
    return next(b for b in ROW_BUCKETS if rows <= b)


def load_words(bits: int, k: int, wanted: int) -> int:
    """uint32 words a thread loads per weight row at once: `wanted` (1, 2 or 4) where K splits
    into chunks that wide, at least the two words 8 values take in 8 bits."""
    words = max(wanted, bits // 4)
    while words > bits // 4 and k % (words * 32 // bits):
        words //= 2
    return words


def project(x: Any, weight: Any, scales: Any, biases: Any, group_size: int, bits: int,
            block: tuple[int, ...] | None = None) -> Any:
    """x (..., K) with 1..MAX_ROWS rows in all, times the affine-quantized weight (N, K)
    transposed: what `mx.quantized_matmul(x, weight, scales, biases, transpose=True, ...)`
    computes (`block`: (features, warps[, words]), for benchmarks)."""
    shape = x.shape
    k, n = shape[-1], scales.shape[0]
    rows = x.size // k
    size = bucket(rows)
    features, warps, *words = block or BLOCKS[bits][size]
    words = load_words(bits, k, words[0] if words else 1)
    (out,) = _kernel()(
        inputs=[x.reshape(rows, k), weight, scales, biases], output_shapes=[(rows, n)],
        **_launch(x.dtype, scales.dtype, n, bits, group_size, size, features, warps, words))
    return out.reshape(*shape[:-1], n)


def fits(layer: Any) -> bool:
    """An affine-quantized layer of a layout the kernel reads: 4 or 8 bits, groups of 32, 64
    or 128, half or float32 scales, and biases."""
    import mlx.core as mx

    scales = layer.get("scales")
    return (
        scales is not None and "biases" in layer
        and getattr(layer, "mode", "affine") == "affine"
        and layer.bits in BITS and layer.group_size in GROUPS
        and scales.dtype in (mx.bfloat16, mx.float16, mx.float32)
        and layer["weight"].ndim == 2 and scales.ndim == 2
    )


def _routes(layer: Any, x: Any) -> bool:
    k = x.shape[-1]
    return (MIN_ROWS * k <= x.size <= MAX_ROWS * k and x.dtype == layer["scales"].dtype
            and x.size > 0)


def _long(layer: Any, x: Any) -> bool:
    return x.size >= LONG_ROWS * x.shape[-1] and x.dtype == layer["scales"].dtype


def dequantized_matmul(x: Any, layer: Any) -> Any:
    """A prompt chunk's projection: the weight dequantized to the scales' dtype for this call
    (a 3072 x 8192 4-bit weight: ~12 MB read, 50 MB written) and one cuBLAS GEMM, where
    MLX's quantized matmul of many rows is far from the GPU's matrix units."""
    import mlx.core as mx

    w = mx.dequantize(layer["weight"], layer["scales"], layer["biases"],
                      group_size=layer.group_size, bits=layer.bits)
    return mx.matmul(x, w.T)


@cache
def routed_classes() -> tuple[type, type]:
    """(QuantizedLinear, QuantizedEmbedding) subclasses whose projections of at most MAX_ROWS
    rows in the scales' dtype go to `project`; others stay MLX's."""
    import mlx.nn as nn

    class QuantRowsLinear(nn.QuantizedLinear):
        def __call__(self, x: Any) -> Any:
            if _routes(self, x):
                y = project(x, self["weight"], self["scales"], self["biases"],
                            self.group_size, self.bits)
            elif _long(self, x):
                y = dequantized_matmul(x, self)
            else:
                return super().__call__(x)
            return y + self["bias"] if "bias" in self else y

    class QuantRowsEmbedding(nn.QuantizedEmbedding):
        def as_linear(self, x: Any) -> Any:  # a tied head
            if _routes(self, x):
                return project(x, self["weight"], self["scales"], self["biases"],
                               self.group_size, self.bits)
            if _long(self, x):
                return dequantized_matmul(x, self)
            return super().as_linear(x)

    return QuantRowsLinear, QuantRowsEmbedding


def install(model: Any, force: bool = False) -> int:
    """Route `model`'s quantized projections through the kernel, on CUDA when enabled (or
    anywhere with `force`, for tests of the switch): returns how many layers it took."""
    import mlx.nn as nn

    if not force and not (enabled() and usable()):
        return 0
    linear, embedding = routed_classes()
    taken = 0
    for _, module in model.named_modules():
        kind = type(module)
        if kind in (nn.QuantizedLinear, nn.QuantizedEmbedding) and fits(module):
            module.__class__ = linear if kind is nn.QuantizedLinear else embedding
            taken += 1
    return taken


def uninstall(model: Any) -> None:
    """MLX's own quantized layers back (a benchmark's A/B switch)."""
    import mlx.nn as nn

    linear, embedding = routed_classes()
    for _, module in model.named_modules():
        if type(module) is linear:
            module.__class__ = nn.QuantizedLinear
        elif type(module) is embedding:
            module.__class__ = nn.QuantizedEmbedding

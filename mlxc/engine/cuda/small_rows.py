"""A projection of a few rows at once, for batched decoding on CUDA.

A batched decode step multiplies a few rows (one per sequence) by each weight matrix. MLX
0.32's CUDA backend runs one row through its gemv kernel but more through cuBLAS, whose
launches cost the host far more, and without the compiled step (cuda/compiled_decode.py) the host
sets a decode step's pace: on the H200 a 3B model's step (float32 weights, no padding) took
9.6 ms at 4 rows and 10.4 at 8 against 6.0 at one; with this kernel 6.6 and 8.1
(`benchmarks/diagnostics/decode_step.py --kernels`, one run). A block reads a few weight rows
(BLOCKS) and computes them for every row of x, so each x chunk it loads serves them all: one step's
projections chained as in the model took 5.9 ms at 4 rows and 7.6 at 8, against 6.7 and 8.8
with one weight row a block (`benchmarks/diagnostics/few_rows.py`, H200). Past 8 rows an earlier
version lost to cuBLAS (13.3 vs 8.1 ms at 16), so more rows keep MLX's matmul, as do Metal and the
CPU; cuda/batch_kernels.py switches it on around batched steps only. It sums in float32 at full
precision, where cuBLAS's float32 goes through TF32 (~3e-4 apart).
"""

from __future__ import annotations

from functools import cache
from typing import Any

MAX_ROWS = 8  # past this cuBLAS was faster (H200); rows are a run-time bound up to it
# Under the compiled decode step (cuda/compiled_decode.py) cuBLAS's device time is lower (one
# step's projections, H200, 3B shape, float32, under ncu: 4.40 ms vs this kernel's 4.71 at 4
# rows, 4.51 vs 5.90 at 8; `benchmarks/diagnostics/step_kernels.py`), but each cuBLAS call costs
# the host more: at 4 rows the whole step was faster with this kernel in one run (6.62 vs 8.78 ms,
# `benchmarks/diagnostics/decode_step.py --kernels --variants batch_compiled`), level in another
# (5.56 ms both, `benchmarks/diagnostics/burst_trace.py --modes compiled,cublas`), and in a third 4
# requests took 0.229 of their sequential time with it against 0.421 with cuBLAS while 8
# streams gave 4.4x against 4.7x. Not settled; 4 is what the target runs measured.
COMPILED_MAX_ROWS = 4
# The block's shape by the weights' item size: (outputs it computes at once, warps splitting
# the input features). Each x chunk a block loads serves all its outputs. float32, of 8
# shapes chained (few_rows.py, H200): 4x4, 2x4 and 8x4 took 5.9 ms at 4 rows (the most the
# compiled step gives it), 4x2 and 2x8 6.0-6.5; at 8 rows 4x2 and 2x8 7.2 against 4x4's 7.6.
# Half types: the same 64 bytes of weight a load, not measured chained. Benchmarks try
# others (`--block` of decode_step.py and burst_trace.py).
BLOCKS = {4: (4, 4), 2: (8, 4)}


_SOURCE = """
    // One block computes FEATURES output features for every row: each x chunk it loads
    // serves FEATURES weight rows, so x's reads through the cache stay near the weights'.
    constexpr int V = 16 / sizeof(T);  // elements per 16-byte load
    const int tid = threadIdx.x;
    const int lane = tid % 32, warp = tid / 32;
    const int M = x_shape[0];  // rows: a run-time bound, so one compiled kernel takes them all
    const int K = w_shape[1];
    const int N = w_shape[0];
    const int chunks = K / V;
    const int n0 = blockIdx.x * FEATURES;
    float acc[FEATURES][MAXM];
    #pragma unroll
    for (int f = 0; f < FEATURES; ++f)
        #pragma unroll
        for (int m = 0; m < MAXM; ++m) acc[f][m] = 0.0f;
    const uint4* wrows[FEATURES];
    #pragma unroll
    for (int f = 0; f < FEATURES; ++f)  // past N (a last, partial block): read row N-1, unused
        wrows[f] = reinterpret_cast<const uint4*>(w + (size_t)min(n0 + f, N - 1) * K);
    const uint4* xs = reinterpret_cast<const uint4*>(x);
    for (int c = tid; c < chunks; c += WARPS * 32) {
        uint4 wv[FEATURES];
        #pragma unroll
        for (int f = 0; f < FEATURES; ++f) wv[f] = wrows[f][c];
        #pragma unroll
        for (int m = 0; m < MAXM; ++m) {
            if (m < M) {
                uint4 xv = xs[m * chunks + c];
                const T* xp = reinterpret_cast<const T*>(&xv);
                float xf[V];
                #pragma unroll
                for (int i = 0; i < V; ++i) xf[i] = static_cast<float>(xp[i]);
                #pragma unroll
                for (int f = 0; f < FEATURES; ++f) {
                    const T* wp = reinterpret_cast<const T*>(&wv[f]);
                    #pragma unroll
                    for (int i = 0; i < V; ++i) acc[f][m] += static_cast<float>(wp[i]) * xf[i];
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


@cache
def _kernel() -> Any:
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name="mlxc_small_rows", input_names=["x", "w"], output_names=["out"], source=_SOURCE
    )


@cache
def _launch(dtype: Any, outputs: int, per_block: int, warps: int) -> dict:
    """The kernel call's fixed arguments for a weight (built once: a step makes ~200 calls,
    and the host sets the step's pace)."""
    blocks = -(-outputs // per_block)
    return {"template": [("T", dtype), ("MAXM", MAX_ROWS), ("FEATURES", per_block),
                         ("WARPS", warps)],
            "grid": (blocks * warps * 32, 1, 1), "threadgroup": (warps * 32, 1, 1),
            "output_dtypes": [dtype]}


def usable() -> bool:
    """Whether this process runs MLX on CUDA (the only backend the kernel is for)."""
    import mlx.core as mx

    try:
        return mx.default_device().type == mx.gpu and mx.cuda.is_available()
    except AttributeError:  # an MLX without a CUDA module
        return False


def project(x: Any, weight: Any, block: tuple[int, int] | None = None) -> Any:
    """x (rows, 1, K) times weight (N, K) transposed, for 2..MAX_ROWS rows of weight's dtype
    (`block`: (features, warps), for benchmarks)."""
    n = weight.shape[0]
    block = block or BLOCKS[weight.dtype.size]
    (out,) = _kernel()(inputs=[x, weight], output_shapes=[(x.shape[0], 1, n)],
                       **_launch(weight.dtype, n, *block))
    return out


def takes(linear: Any) -> bool:
    """A plain float linear layer whose rows fill 16-byte loads."""
    import mlx.core as mx
    import mlx.nn as nn

    weight = linear.get("weight") if type(linear) is nn.Linear else None
    return (
        weight is not None
        and weight.ndim == 2
        and weight.dtype in (mx.float32, mx.bfloat16, mx.float16)
        and (weight.shape[1] * weight.itemsize) % 16 == 0
    )


@cache
def routed_linear(max_rows: int = MAX_ROWS) -> type:
    """nn.Linear that sends a decode step's few rows (x of shape (rows, 1, K), 2..max_rows)
    to `project`."""
    import mlx.nn as nn

    class SmallRowsLinear(nn.Linear):
        def __call__(self, x: Any) -> Any:
            shape, weight = x.shape, self["weight"]
            if len(shape) == 3 and shape[1] == 1 and 2 <= shape[0] <= max_rows and (
                x.dtype == weight.dtype
            ):
                y = project(x, weight)
                return y + self["bias"] if "bias" in self else y
            return super().__call__(x)

    return SmallRowsLinear

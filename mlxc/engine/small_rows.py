"""A projection of a few rows at once, for batched decoding on CUDA.

A batched decode step multiplies a few rows (one per sequence) by each weight matrix. MLX
0.32's CUDA backend runs one row through its gemv kernel but more through cuBLAS, whose
launches cost the host far more: on the H200 a 3B model's step with plain weights took
~10 ms at 2-4 rows against ~5.4 ms at one (`benchmarks/decode_step.py --kernels`), the
host, not the GPU, being the limit. This kernel reads each weight row once for all the rows,
as gemv does for one, and launches as cheaply: the same step took 5.3 ms at 4 rows and
6.9 ms at 8 (mlx-lm's padded batch cache: 6.7 and 8.2 ms, from 13.0 and 14.6). Past 8 rows
it lost to cuBLAS (13.3 vs 8.1 ms at 16), so more rows keep MLX's matmul, as do Metal and
the CPU. It sums in float32 in full precision, where cuBLAS's float32 uses TF32 (relative
difference ~3e-4).
"""

from __future__ import annotations

from functools import cache
from typing import Any

MAX_ROWS = 8  # past this cuBLAS was faster (H200); rows are a run-time bound up to it
THREADS = 128  # a block: 4 warps split the input features between them
FEATURES = 4  # output features a block computes (each row of x read once for them all)

_SOURCE = """
    constexpr int V = 16 / sizeof(T);  // elements per 16-byte load
    constexpr int WARPS = 4;
    const int n0 = blockIdx.x * R;  // R output features a block: x is read once for all R
    const int tid = threadIdx.x;
    const int M = x_shape[0];  // rows: a run-time bound, so one compiled kernel takes them all
    const int K = x_shape[1];
    const int N = w_shape[0];
    const int chunks = K / V;
    float acc[R][MAXM];
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int m = 0; m < MAXM; ++m) acc[r][m] = 0.0f;
    }
    const uint4* xs = reinterpret_cast<const uint4*>(x);
    const uint4* ws = reinterpret_cast<const uint4*>(w + (size_t)n0 * K);
    for (int c = tid; c < chunks; c += WARPS * 32) {
        float xf[MAXM][V];
        #pragma unroll
        for (int m = 0; m < MAXM; ++m) {
            if (m < M) {
                uint4 xv = xs[m * chunks + c];
                const T* xp = reinterpret_cast<const T*>(&xv);
                #pragma unroll
                for (int i = 0; i < V; ++i) xf[m][i] = static_cast<float>(xp[i]);
            }
        }
        #pragma unroll
        for (int r = 0; r < R; ++r) {
            uint4 wv = ws[r * chunks + c];
            const T* wp = reinterpret_cast<const T*>(&wv);
            float wf[V];
            #pragma unroll
            for (int i = 0; i < V; ++i) wf[i] = static_cast<float>(wp[i]);
            #pragma unroll
            for (int m = 0; m < MAXM; ++m) {
                if (m < M) {
                    #pragma unroll
                    for (int i = 0; i < V; ++i) acc[r][m] += wf[i] * xf[m][i];
                }
            }
        }
    }
    __shared__ float partial[WARPS][R * MAXM];
    const int lane = tid % 32, warp = tid / 32;
    #pragma unroll
    for (int r = 0; r < R; ++r) {
        #pragma unroll
        for (int m = 0; m < MAXM; ++m) {
            if (m < M) {
                float v = acc[r][m];
                #pragma unroll
                for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffff, v, off);
                if (lane == 0) partial[warp][r * MAXM + m] = v;
            }
        }
    }
    __syncthreads();
    if (tid < R * MAXM && tid % MAXM < M) {
        float v = 0.0f;
        #pragma unroll
        for (int i = 0; i < WARPS; ++i) v += partial[i][tid];
        out[(size_t)(tid % MAXM) * N + n0 + tid / MAXM] = static_cast<T>(v);
    }
"""


@cache
def _kernel() -> Any:
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name="mlxc_small_rows", input_names=["x", "w"], output_names=["out"], source=_SOURCE
    )


def usable() -> bool:
    """Whether this process runs MLX on CUDA (the only backend the kernel is for)."""
    import mlx.core as mx

    try:
        return mx.default_device().type == mx.gpu and mx.cuda.is_available()
    except AttributeError:  # an MLX without a CUDA module
        return False


def project(x: Any, weight: Any) -> Any:
    """x (..., K) times weight (N, K) transposed, for the few rows `fits` allows."""
    rows = x.size // x.shape[-1]
    n = weight.shape[0]
    (out,) = _kernel()(
        inputs=[x.reshape(rows, x.shape[-1]), weight],
        template=[("T", weight.dtype), ("MAXM", MAX_ROWS), ("R", FEATURES)],
        grid=(n // FEATURES * THREADS, 1, 1),
        threadgroup=(THREADS, 1, 1),
        output_shapes=[(rows, n)],
        output_dtypes=[weight.dtype],
    )
    return out.reshape(*x.shape[:-1], n)


def fits(x: Any, weight: Any) -> bool:
    import mlx.core as mx

    return (
        x.ndim > 0
        and 2 <= x.size // max(x.shape[-1], 1) <= MAX_ROWS
        and weight.ndim == 2
        and weight.shape[0] % FEATURES == 0
        and x.dtype == weight.dtype
        and weight.dtype in (mx.float32, mx.bfloat16, mx.float16)
        and (weight.shape[1] * weight.itemsize) % 16 == 0
    )


def install(model: Any) -> int:
    """Route the model's plain linear layers through `project` when a step has few rows;
    returns how many were routed. Quantized layers are left alone (MLX's own kernels)."""
    import mlx.nn as nn

    routed_class = _small_rows_linear()
    routed = 0
    for _, module in model.named_modules():
        if type(module) is nn.Linear:
            module.__class__ = routed_class
            routed += 1
    return routed


@cache
def _small_rows_linear() -> type:
    import mlx.nn as nn

    class SmallRowsLinear(nn.Linear):
        def __call__(self, x: Any) -> Any:
            weight = self["weight"]
            if not fits(x, weight):
                return super().__call__(x)
            y = project(x, weight)
            return y + self["bias"] if "bias" in self else y

    return SmallRowsLinear

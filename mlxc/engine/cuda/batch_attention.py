"""Attention of one new token per sequence over a left-padded batch cache, on CUDA.

mlx-lm's `BatchKVCache` left-pads shorter sequences and masks the padding with a boolean
array. MLX 0.32's CUDA backend has no vector kernel for a masked query, so each layer of a
batched decode step goes to cuDNN, whose launch costs the host more than the GPU's work: on
the H200 a 3B model's step at 4 rows took 6.7 ms in the padded batch cache against 5.3 ms
unpadded (`benchmarks/diagnostics/decode_step.py --kernels`), and the host sets a decode step's
pace; with this kernel, 6.1 against 5.7 in another run. It is MLX's one-pass vector attention
(32 warps over the keys, an online softmax each, merged at the end) with each row starting
at its own first real key, so it needs no mask. Everything else (prefill, one sequence,
other caches, sinks) keeps MLX's; cuda/batch_kernels.py routes it around batched steps only.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

_HEADER = """
template <typename T, int N>
struct __align__(sizeof(T) * N) Pack { T e[N]; };
"""
_SOURCE = """
    constexpr int WARPS = 32;
    constexpr int PER = D / 32;  // elements of a head each lane holds
    const int h = blockIdx.x;
    const int b = blockIdx.y;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int Hq = q_shape[1];
    const int kvh = h / (Hq / k_shape[1]);
    const int keys = min(k_shape[2], stop[0]);  // the compiled step passes whole buffers
    const T* qp = q + b * q_strides[0] + h * q_strides[1];
    const T* kp = k + b * k_strides[0] + kvh * k_strides[1];
    const T* vp = v + b * v_strides[0] + kvh * v_strides[1];
    const auto qs = q_strides[3], ks = k_strides[3], vs = v_strides[3];
    float qv[PER], acc[PER];
    #pragma unroll
    for (int i = 0; i < PER; ++i) {
        qv[i] = static_cast<float>(qp[(lane * PER + i) * qs]) * scale[0];
        acc[i] = 0.0f;
    }
    float m = -1e30f, l = 0.0f;  // a warp that meets no key keeps l = 0 and adds nothing
    // A lane's PER elements of a key or value in one load where they lie packed and aligned
    // (the compiled step's buffers); element by element otherwise.
    const bool packed = ks == 1 && vs == 1 && k_strides[2] % PER == 0 && v_strides[2] % PER == 0
        && reinterpret_cast<size_t>(kp) % sizeof(Pack<T, PER>) == 0
        && reinterpret_cast<size_t>(vp) % sizeof(Pack<T, PER>) == 0;
    for (int t = starts[b] + warp; t < keys; t += WARPS) {
        const T* kt = kp + t * k_strides[2];
        const T* vt = vp + t * v_strides[2];
        float kf[PER], vf[PER];
        if (packed) {
            const Pack<T, PER> kk = reinterpret_cast<const Pack<T, PER>*>(kt)[lane];
            const Pack<T, PER> vv = reinterpret_cast<const Pack<T, PER>*>(vt)[lane];
            #pragma unroll
            for (int i = 0; i < PER; ++i) {
                kf[i] = static_cast<float>(kk.e[i]);
                vf[i] = static_cast<float>(vv.e[i]);
            }
        } else {
            #pragma unroll
            for (int i = 0; i < PER; ++i) {
                kf[i] = static_cast<float>(kt[(lane * PER + i) * ks]);
                vf[i] = static_cast<float>(vt[(lane * PER + i) * vs]);
            }
        }
        float s = 0.0f;
        #pragma unroll
        for (int i = 0; i < PER; ++i) s += qv[i] * kf[i];
        #pragma unroll
        for (int off = 16; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffff, s, off);
        const float top = fmaxf(m, s);
        const float fade = expf(m - top), weight = expf(s - top);
        l = l * fade + weight;
        #pragma unroll
        for (int i = 0; i < PER; ++i) acc[i] = acc[i] * fade + weight * vf[i];
        m = top;
    }
    __shared__ float tops[WARPS], sums[WARPS];
    __shared__ float outs[WARPS][D];
    if (lane == 0) { tops[warp] = m; sums[warp] = l; }
    #pragma unroll
    for (int i = 0; i < PER; ++i) outs[warp][lane * PER + i] = acc[i];
    __syncthreads();
    if (threadIdx.x < D) {
        float top = -1e30f;
        for (int w = 0; w < WARPS; ++w) top = fmaxf(top, tops[w]);
        float total = 0.0f, o = 0.0f;
        for (int w = 0; w < WARPS; ++w) {
            const float fade = expf(tops[w] - top);
            total += sums[w] * fade;
            o += outs[w][threadIdx.x] * fade;
        }
        out[((size_t)b * Hq + h) * D + threadIdx.x] = static_cast<T>(o / total);
    }
"""


@cache
def _kernel() -> Any:
    import mlx.core as mx

    return mx.fast.cuda_kernel(
        name="mlxc_batch_decode_attention", input_names=["q", "k", "v", "starts", "stop", "scale"],
        output_names=["out"], source=_SOURCE, header=_HEADER, ensure_row_contiguous=False,
    )


@cache
def _scale(value: float) -> Any:
    import mlx.core as mx

    return mx.array([value], mx.float32)


@cache
def _no_stop() -> Any:
    import mlx.core as mx

    return mx.array([2**30], mx.int32)


@cache
def _names() -> tuple[type, tuple, Any]:
    """mlx-lm's batch cache class, the dtypes the kernel reads, int32: looked up once (the
    check runs in every layer of every batched step, whose pace the host sets)."""
    import mlx.core as mx
    from mlx_lm.models.cache import BatchKVCache

    return BatchKVCache, (mx.float32, mx.bfloat16, mx.float16), mx.int32


def fits(queries: Any, keys: Any, cache: Any, sinks: Any) -> bool:
    """A decode step (one query per row) over mlx-lm's left-padded batch cache, no sinks,
    heads the kernel's lanes divide, a dtype it reads."""
    return (
        type(cache) is _names()[0]
        and sinks is None
        and getattr(cache, "_right_padding", None) is None
        and kernel_fits(queries, keys)
    )


def kernel_fits(queries: Any, keys: Any) -> bool:
    """One query per row, heads the kernel's lanes divide, a dtype it reads."""
    return (
        queries.ndim == 4 and queries.shape[2] == 1
        and queries.shape[-1] in (64, 128, 256) and keys.shape[-1] == queries.shape[-1]
        and queries.shape[1] % keys.shape[1] == 0
        and queries.dtype == keys.dtype
        and queries.dtype in _names()[1]
    )


def attend(queries: Any, keys: Any, values: Any, starts: Any, scale: float,
           stop: Any = None) -> Any:
    """softmax(q k^T * scale) v over each row's keys from `starts[row]` up to `stop` (an
    int32 array; all of them without); q (B, H, 1, D)."""
    int32 = _names()[2]
    batch, heads, _, dim = queries.shape
    (out,) = _kernel()(
        inputs=[queries, keys, values, starts if starts.dtype == int32 else
                starts.astype(int32), _no_stop() if stop is None else stop, _scale(scale)],
        template=[("T", queries.dtype), ("D", dim)],
        grid=(heads * 1024, batch, 1),
        threadgroup=(1024, 1, 1),
        output_shapes=[(batch, heads, 1, dim)],
        output_dtypes=[queries.dtype],
    )
    return out


def routed(original: Callable) -> Callable:
    """mlx-lm's attention helper (models/base.py), with a batched decode step's attention
    sent to `attend` where it fits."""

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if fits(queries, keys, cache, sinks):
            return attend(queries, keys, values, cache.left_padding, scale)
        return original(queries, keys, values, cache=cache, scale=scale, mask=mask,
                        sinks=sinks)

    return scaled_dot_product_attention

"""The quantized few-rows kernel (engine/cuda/quant_rows.py): that the layout it reads is MLX's
(checked on any backend by a numpy mirror of the kernel's arithmetic), which layers it takes,
that the switch routes only what fits, and on CUDA that it computes what `mx.quantized_matmul`
computes (`python -m pytest tests/test_quant_kernels.py` on the GPU machine); elsewhere the
kernel tests are skipped, as the other CUDA tests are."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlxc.engine.cuda import quant_rows

on_cuda = pytest.mark.skipif(not quant_rows.usable(), reason="the kernel is CUDA's")
LAYOUTS = [(4, 32), (4, 64), (4, 128), (8, 32), (8, 64), (8, 128)]


def mirror(x, w, scales, biases, group, bits):
    """The kernel's arithmetic in numpy: per chunk of 8 values, s * (q . x) + b * sum(x)."""
    x = np.asarray(x.astype(mx.float32)).reshape(-1, x.shape[-1])
    w = np.asarray(w).astype(np.uint64)
    s, b = (np.asarray(a.astype(mx.float32)) for a in (scales, biases))
    per_word, k = 32 // bits, x.shape[1]
    shifts = (bits * np.arange(per_word)).astype(np.uint64)
    q = ((w[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(w.shape[0], k).astype(np.float32)
    chunks = k // 8
    qc, xc = q.reshape(-1, chunks, 8), x.reshape(-1, chunks, 8)
    dot = np.einsum("nci,mci->mnc", qc, xc)
    group_of = np.arange(chunks) * 8 // group
    return (dot * s[:, group_of][None] + xc.sum(-1)[:, None, :] * b[:, group_of][None]).sum(-1)


def quantized(n, k, group, bits, dtype=mx.bfloat16, seed=0):
    mx.random.seed(seed)
    weight = (mx.random.normal((n, k)) * 0.02).astype(dtype)
    w, scales, biases = mx.quantize(weight, group_size=group, bits=bits)
    return w, scales, biases


@pytest.mark.parametrize(("bits", "group"), LAYOUTS)
def test_the_kernels_arithmetic_reads_mlxs_affine_layout(bits, group):
    w, scales, biases = quantized(48, 256, group, bits, mx.float32)
    x = mx.random.normal((3, 256))
    want = mx.quantized_matmul(x, w, scales, biases, transpose=True, group_size=group,
                               bits=bits, stream=mx.cpu)
    got = mirror(x, w, scales, biases, group, bits)
    assert np.abs(got - np.asarray(want)).max() <= 1e-4 * np.abs(np.asarray(want)).max()


def test_it_takes_affine_layers_of_the_layouts_it_reads():
    assert quant_rows.fits(nn.QuantizedLinear(256, 64, group_size=64, bits=4))
    assert quant_rows.fits(nn.QuantizedLinear(256, 64, group_size=32, bits=8))
    assert quant_rows.fits(nn.QuantizedEmbedding(100, 256, group_size=64, bits=4))
    assert not quant_rows.fits(nn.QuantizedLinear(256, 64, group_size=64, bits=3))
    assert not quant_rows.fits(nn.QuantizedLinear(256, 64, group_size=64, bits=6))
    assert not quant_rows.fits(nn.QuantizedLinear(256, 64, mode="mxfp4"))


def test_the_switch_routes_quantized_layers_and_gives_them_back(monkeypatch):
    model = nn.Sequential(nn.QuantizedLinear(256, 64, bits=4), nn.Linear(64, 64),
                          nn.QuantizedLinear(64, 64, bits=3))
    assert quant_rows.install(model, force=True) == 1
    assert type(model.layers[0]).__name__ == "QuantRowsLinear"
    assert type(model.layers[2]) is nn.QuantizedLinear  # 3 bits: MLX's own
    quant_rows.uninstall(model)
    assert type(model.layers[0]) is nn.QuantizedLinear
    monkeypatch.setenv(quant_rows.ENV, "0")
    assert not quant_rows.enabled() and quant_rows.install(model) == 0
    monkeypatch.delenv(quant_rows.ENV)
    assert not quant_rows.enabled()  # off by default until measured on a GPU


@pytest.mark.skipif(quant_rows.usable(), reason="on CUDA the layers route to the kernel")
def test_off_cuda_nothing_is_routed_and_many_rows_stay_mlxs(tiny_model):
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    assert quant_rows.install(model) == 0
    layer = nn.QuantizedLinear(256, 64, bits=4)
    x = mx.random.normal((2, 20, 256))
    want = layer(x)
    quant_rows.install(nn.Sequential(layer), force=True)
    assert mx.array_equal(layer(x), want)  # 40 rows: past MAX_ROWS, MLX's matmul


@on_cuda
@pytest.mark.parametrize(("bits", "group"), LAYOUTS)
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 13, 16])
def test_the_kernel_computes_mlxs_quantized_matmul(bits, group, rows):
    w, scales, biases = quantized(1003, 3072, group, bits, seed=rows)  # partial last block
    x = mx.random.normal((rows, 1, 3072)).astype(mx.bfloat16)
    got = quant_rows.project(x, w, scales, biases, group, bits).astype(mx.float32)
    want = mx.quantized_matmul(x.astype(mx.float32), w, scales.astype(mx.float32),
                               biases.astype(mx.float32), transpose=True, group_size=group,
                               bits=bits, stream=mx.cpu)
    assert got.shape == (rows, 1, 1003)
    # bfloat16 output: one rounding of the float32 sum, ~2^-8 of the largest value
    assert mx.abs(got - want).max().item() <= 8e-3 * mx.abs(want).max().item()


def test_a_thread_loads_as_many_words_as_k_splits_into():
    assert quant_rows.load_words(4, 3072, 4) == 4  # 32 values a load
    assert quant_rows.load_words(4, 3072 + 16, 4) == 2  # 16 values: K splits no wider
    assert quant_rows.load_words(4, 3072 + 8, 4) == 1
    assert quant_rows.load_words(8, 3072, 1) == 2  # 8 values take two words in 8 bits
    assert quant_rows.load_words(8, 3072 + 8, 4) == 2


@on_cuda
@pytest.mark.parametrize(("bits", "group"), LAYOUTS)
@pytest.mark.parametrize("block", [(4, 4, 1), (4, 4, 4), (8, 2, 4)])
def test_each_load_width_computes_mlxs_quantized_matmul(bits, group, block, rows=3):
    """(features, warps, words): each kernel shape is a compile of its own (~1 s), so the
    widths are checked at one row count; the row counts above at the default shape."""
    w, scales, biases = quantized(515, 2048, group, bits, seed=rows)
    x = mx.random.normal((rows, 2048)).astype(mx.bfloat16)
    got = quant_rows.project(x, w, scales, biases, group, bits, block).astype(mx.float32)
    want = mx.quantized_matmul(x.astype(mx.float32), w, scales.astype(mx.float32),
                               biases.astype(mx.float32), transpose=True, group_size=group,
                               bits=bits, stream=mx.cpu)
    assert mx.abs(got - want).max().item() <= 8e-3 * mx.abs(want).max().item()


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_the_kernel_takes_other_activation_dtypes(dtype):
    w, scales, biases = quantized(512, 2048, 64, 4, dtype)
    x = mx.random.normal((4, 2048)).astype(dtype)
    got = quant_rows.project(x, w, scales, biases, 64, 4).astype(mx.float32)
    want = mx.quantized_matmul(x.astype(mx.float32), w, scales.astype(mx.float32),
                               biases.astype(mx.float32), transpose=True, group_size=64,
                               bits=4, stream=mx.cpu)
    tolerance = 1e-5 if dtype == mx.float32 else 4e-3
    assert mx.abs(got - want).max().item() <= tolerance * mx.abs(want).max().item()


@on_cuda
def test_greedy_answers_with_it_equal_mlxs_own(tiny_model, monkeypatch):
    from mlx_lm import load, stream_generate

    monkeypatch.setenv(quant_rows.ENV, "1")
    model, tokenizer = load(str(tiny_model))
    nn.quantize(model, group_size=64, bits=4)
    prompts = ["the fox", "a b c d", "once upon a time"]

    def answers():
        return [[r.token for r in stream_generate(model, tokenizer, p, max_tokens=24)]
                for p in prompts]

    plain = answers()
    assert quant_rows.install(model) > 0
    try:
        assert answers() == plain
    finally:
        quant_rows.uninstall(model)

"""The few-rows projection kernel (engine/cuda/small_rows.py): which projections it takes, that
it computes what MLX's matmul computes, and that answers made in a batch with it routed equal
the same requests alone. The kernel runs only on CUDA: there these tests run it for real
(`python -m pytest tests/test_small_rows.py` on the GPU machine); elsewhere they check that
nothing is routed."""

from __future__ import annotations

import sys

import mlx.core as mx
import mlx.nn as nn
import pytest

from mlxc.config import ConfigError, load_settings
from mlxc.engine.cuda import small_rows
from mlxc.request import GenerationRequest

on_cuda = pytest.mark.skipif(not small_rows.usable(), reason="the kernel is CUDA's")


def test_it_takes_plain_float_layers_whose_rows_fill_16_byte_loads():
    assert small_rows.takes(nn.Linear(64, 32))
    assert small_rows.takes(nn.Linear(64, 32, bias=False))
    half = nn.Linear(64, 32)
    half.set_dtype(mx.bfloat16)
    assert small_rows.takes(half)
    assert not small_rows.takes(nn.Linear(6, 32))  # 24 bytes a row: no 16-byte loads
    assert not small_rows.takes(nn.QuantizedLinear(64, 32))  # MLX's own quantized kernels
    assert not small_rows.takes(nn.Embedding(10, 64))


def test_the_setting_turns_it_off_and_refuses_nonsense(monkeypatch):
    assert load_settings().batch_kernels
    monkeypatch.setenv("MLXC_BATCH_KERNELS", "off")
    assert not load_settings().batch_kernels
    monkeypatch.setenv("MLXC_BATCH_KERNELS", "maybe")
    with pytest.raises(ConfigError, match="MLXC_BATCH_KERNELS"):
        load_settings()


@pytest.mark.skipif(small_rows.usable(), reason="on CUDA the engine routes them")
def test_off_cuda_the_engine_switches_nothing_on(tiny_model, tmp_path):
    from test_batching import make_engine

    from mlxc.engine.cuda.batch_kernels import BatchKernels

    engine = make_engine(tiny_model, tmp_path, prefix=False)
    try:
        assert not isinstance(engine.batch_kernels, BatchKernels)
        assert engine.submit(GenerationRequest(prompt="the fox", max_tokens=4)).result().text
    finally:
        engine.shutdown(wait=30)


def test_the_switch_routes_only_inside_it(tiny_model):
    """Checked off CUDA as well: the switch itself needs no GPU, only its kernels do."""
    from mlx_lm import load

    from mlxc.engine.cuda.batch_kernels import BatchKernels

    model, _ = load(str(tiny_model))
    module = sys.modules[type(model).__module__]
    plain_attention = module.scaled_dot_product_attention
    kernels = BatchKernels(model)
    kinds = {type(m).__name__ for _, m in model.named_modules()}
    with kernels:
        inside = {type(m).__name__ for _, m in model.named_modules()}
        assert module.scaled_dot_product_attention is not plain_attention
    assert "SmallRowsLinear" in inside and "SmallRowsLinear" not in kinds
    assert {type(m).__name__ for _, m in model.named_modules()} == kinds
    assert module.scaled_dot_product_attention is plain_attention


def test_under_the_compiled_step_projections_of_more_rows_stay_mlxs(tiny_model):
    """The compiled step's switch routes projections of at most COMPILED_MAX_ROWS rows (and
    none with 0); attention is routed either way. Needs no GPU: a projection past the cap is
    MLX's matmul."""
    from mlx_lm import load

    from mlxc.engine.cuda.batch_kernels import BatchKernels

    model, _ = load(str(tiny_model))
    module = sys.modules[type(model).__module__]
    plain_attention = module.scaled_dot_product_attention
    with BatchKernels(model, max_rows=0):
        assert module.scaled_dot_product_attention is not plain_attention
        assert "SmallRowsLinear" not in {type(m).__name__ for _, m in model.named_modules()}
    proj = model.layers[0].mlp.down_proj
    x = mx.random.normal((small_rows.COMPILED_MAX_ROWS + 1, 1, proj.weight.shape[1]))
    want = proj(x)
    with BatchKernels(model, max_rows=small_rows.COMPILED_MAX_ROWS):
        assert type(proj).__name__ == "SmallRowsLinear"
        assert mx.array_equal(proj(x), want)
    assert type(proj) is nn.Linear


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("rows", [2, 3, 5, 8])
def test_the_kernel_computes_the_matmul(dtype, rows):
    mx.random.seed(rows)
    weight = (mx.random.normal((1024, 3072)) * 0.02).astype(dtype)
    x = mx.random.normal((rows, 1, 3072)).astype(dtype)
    got = small_rows.project(x, weight).astype(mx.float32)  # x: (rows, 1, K), a decode step
    # On the CPU: cuBLAS's float32 matmul rounds through TF32, coarser than the kernel.
    want = mx.matmul(x.astype(mx.float32), weight.astype(mx.float32).T, stream=mx.cpu)
    assert got.shape == (rows, 1, 1024)
    scale = mx.abs(want).max().item()
    tolerance = 1e-5 if dtype == mx.float32 else 1e-2
    assert mx.abs(got - want).max().item() <= tolerance * scale


@on_cuda
@pytest.mark.parametrize("block", [(1, 4), (4, 4), (8, 2), (4, 8)])
def test_every_block_shape_computes_the_matmul_with_a_partial_last_block(block):
    mx.random.seed(7)
    weight = mx.random.normal((1003, 2048)) * 0.02  # 1003 outputs: the last block is partial
    x = mx.random.normal((6, 1, 2048))
    got = small_rows.project(x, weight, block)
    want = mx.matmul(x, weight.T, stream=mx.cpu)
    assert got.shape == (6, 1, 1003)
    assert mx.abs(got - want).max().item() <= 1e-5 * mx.abs(want).max().item()


@on_cuda
def test_answers_made_together_with_it_equal_the_same_requests_alone(tiny_model, tmp_path):
    from test_batching import PROMPTS, chat, make_engine

    from mlxc.engine.cuda.batch_kernels import BatchKernels

    engine = make_engine(tiny_model, tmp_path, prefix=False, max_batch=8)
    try:
        assert isinstance(engine.batch_kernels, BatchKernels)
        requests = [chat(p) for p in PROMPTS]
        alone = [engine.submit(r).result() for r in requests]
        together = [g.result() for g in [engine.submit(r) for r in requests]]
        assert [a.text for a in together] == [a.text for a in alone]
        assert max(engine.figures()["batch_sizes"]) > 1
    finally:
        engine.shutdown(wait=30)


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_the_batch_attention_kernel_skips_each_rows_padding(dtype):
    """Left-padded rows (mlx-lm's BatchKVCache) attended without a mask equal MLX's masked
    attention, computed on the CPU."""
    from mlx_lm.models.cache import BatchKVCache

    from mlxc.engine.cuda import batch_attention

    mx.random.seed(3)
    pads = [0, 5, 17, 40]
    cache = BatchKVCache(pads)
    keys = mx.random.normal((4, 2, 70, 128)).astype(dtype)
    values = mx.random.normal((4, 2, 70, 128)).astype(dtype)
    cache.update_and_fetch(keys[:, :, :69], values[:, :, :69])
    mask = cache.make_mask(1)
    k, v = cache.update_and_fetch(keys[:, :, 69:], values[:, :, 69:])
    queries = mx.random.normal((4, 8, 1, 128)).astype(dtype)
    assert batch_attention.fits(queries, k, cache, None)
    got = batch_attention.attend(queries, k, v, cache.left_padding, 0.088).astype(mx.float32)
    want = mx.fast.scaled_dot_product_attention(
        queries.astype(mx.float32), k.astype(mx.float32), v.astype(mx.float32), scale=0.088,
        mask=mask, stream=mx.cpu)
    assert mask.shape[-1] == k.shape[2]
    tolerance = 1e-5 if dtype == mx.float32 else 2e-2
    assert mx.abs(got - want).max().item() <= tolerance * mx.abs(want).max().item()

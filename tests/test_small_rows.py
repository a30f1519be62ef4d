"""The few-rows projection kernel (engine/small_rows.py): which projections it takes, that
it computes what MLX's matmul computes, and that answers made in a batch with it routed equal
the same requests alone. The kernel runs only on CUDA: there these tests run it for real
(`python -m pytest tests/test_small_rows.py` on the GPU machine); elsewhere they check that
nothing is routed."""

from __future__ import annotations

import mlx.core as mx
import pytest

from mlxc.config import ConfigError, load_settings
from mlxc.engine import small_rows


def module_kinds(engine) -> set[str]:
    return engine.call(lambda e: {type(m).__name__ for _, m in e.model.named_modules()}).result()


on_cuda = pytest.mark.skipif(not small_rows.usable(), reason="the kernel is CUDA's")


def test_it_takes_two_to_eight_rows_of_plain_float_weights():
    weight = mx.zeros((32, 64), mx.float32)
    assert small_rows.fits(mx.zeros((4, 1, 64)), weight)
    assert small_rows.fits(mx.zeros((8, 1, 64)), weight)
    assert not small_rows.fits(mx.zeros((1, 1, 64)), weight)  # one row: MLX's gemv
    assert not small_rows.fits(mx.zeros((9, 1, 64)), weight)  # cuBLAS is faster there
    assert not small_rows.fits(mx.zeros((1, 512, 64)), weight)  # a prefill chunk
    assert not small_rows.fits(mx.zeros((4, 1, 64), mx.bfloat16), weight)  # mixed dtypes
    odd = mx.zeros((32, 6), mx.float32)  # 24 bytes a row: no 16-byte loads
    assert not small_rows.fits(mx.zeros((4, 1, 6)), odd)
    assert not small_rows.fits(mx.zeros((4, 1, 64)), mx.zeros((30, 64)))  # 4 features a block


def test_the_setting_turns_it_off_and_refuses_nonsense(monkeypatch):
    assert load_settings().batch_kernels
    monkeypatch.setenv("MLXC_BATCH_KERNELS", "off")
    assert not load_settings().batch_kernels
    monkeypatch.setenv("MLXC_BATCH_KERNELS", "maybe")
    with pytest.raises(ConfigError, match="MLXC_BATCH_KERNELS"):
        load_settings()


@pytest.mark.skipif(small_rows.usable(), reason="on CUDA the engine routes them")
def test_off_cuda_the_engine_routes_nothing(tiny_model, tmp_path):
    from test_batching import make_engine

    engine = make_engine(tiny_model, tmp_path, prefix=False)
    try:
        assert "SmallRowsLinear" not in module_kinds(engine)
        assert "Linear" in module_kinds(engine)
    finally:
        engine.shutdown(wait=30)


@on_cuda
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
@pytest.mark.parametrize("rows", [2, 3, 5, 8])
def test_the_kernel_computes_the_matmul(dtype, rows):
    mx.random.seed(rows)
    weight = (mx.random.normal((1024, 3072)) * 0.02).astype(dtype)
    x = mx.random.normal((rows, 1, 3072)).astype(dtype)
    got = small_rows.project(x, weight).astype(mx.float32)
    # On the CPU: cuBLAS's float32 matmul rounds through TF32, coarser than the kernel.
    want = mx.matmul(x.astype(mx.float32), weight.astype(mx.float32).T, stream=mx.cpu)
    assert got.shape == (rows, 1, 1024)
    scale = mx.abs(want).max().item()
    tolerance = 1e-5 if dtype == mx.float32 else 1e-2
    assert mx.abs(got - want).max().item() <= tolerance * scale


@on_cuda
def test_answers_made_together_with_it_equal_the_same_requests_alone(tiny_model, tmp_path):
    from test_batching import PROMPTS, chat, make_engine

    engine = make_engine(tiny_model, tmp_path, prefix=False, max_batch=8)
    try:
        assert "SmallRowsLinear" in module_kinds(engine)
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

    from mlxc.engine import batch_attention

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

"""Stacked projections (engine/cuda/fused_projections.py): q/k/v and gate/up as one matmul give
exactly the model's own logits and greedy tokens, quantized in 4 and 8 bits, through
mlx-lm's prefill and its lone loop, under the compiled step too; the weights are held once;
a projection called out of its group's order still computes its own output. The engine stacks
them on CUDA only, but the stacking runs anywhere, so these tests run on the CPU."""

from __future__ import annotations

import pytest
from tiny_model import rescaled_copy

from mlxc.engine.cuda import fused_projections, small_rows
from mlxc.engine.cuda.compiled_decode import CompiledDecode


def loaded(folder, bits):
    import mlx.nn as nn
    from mlx_lm import load

    model, tokenizer = load(str(folder))
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    return model, tokenizer


def greedy(model, prompt, count=24):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=count)]


def weight_bytes(model):
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@pytest.fixture(scope="module")
def lively(tiny_model, tmp_path_factory):
    return rescaled_copy(tiny_model, tmp_path_factory.mktemp("fused") / "lively", 4.0)


@pytest.mark.parametrize("bits", [4, 8])
def test_stacked_projections_give_the_model_s_own_logits_and_tokens(lively, bits):
    import mlx.core as mx

    model, tokenizer = loaded(lively, bits)
    prompt = tokenizer.encode("a long way home, said the old sailor to the fox")
    want_logits = model(mx.array(prompt)[None])
    want = greedy(model, prompt)
    before = weight_bytes(model)
    assert fused_projections.fuse(model) == 2 * len(model.layers)  # attention and MLP, each layer
    assert weight_bytes(model) == before  # stacked, not copied beside the originals
    assert mx.array_equal(model(mx.array(prompt)[None]), want_logits)
    assert greedy(model, prompt) == want
    compiled = CompiledDecode(model)
    assert greedy(compiled, prompt) == want
    assert compiled.failed is None and compiled.lone_steps > 0


def test_a_projection_called_out_of_order_computes_its_own_output(lively):
    import mlx.core as mx

    model, _ = loaded(lively, 4)
    attention = model.layers[0].self_attn
    x, other = mx.random.normal((1, 3, 64)), mx.random.normal((1, 3, 64))
    want = [attention.q_proj(x), attention.k_proj(other), attention.v_proj(x)]
    fused_projections.fuse(model)
    got = [attention.q_proj(x), attention.k_proj(other), attention.v_proj(x)]
    assert all(mx.array_equal(a, b) for a, b in zip(got, want, strict=True))
    assert not attention.q_proj._stack._input or attention.q_proj._stack._left > 0


def test_layers_that_differ_or_are_plain_are_left_as_they_are(lively):
    import mlx.nn as nn

    plain, _ = loaded(lively, None)
    assert fused_projections.fuse(plain) == 0  # stacking plain weights is not exact (BLAS)
    model, _ = loaded(lively, 4)
    attention = model.layers[0].self_attn
    attention.k_proj = nn.Linear(64, attention.k_proj.weight.shape[0], bias=False)  # not quantized
    fused_projections.fuse(model)
    assert type(attention.q_proj) is nn.QuantizedLinear  # that group stays apart
    assert type(model.layers[1].self_attn.q_proj) is not nn.QuantizedLinear  # the others stack


def test_it_is_applied_on_cuda_only(lively):
    model, _ = loaded(lively, 4)
    applied = fused_projections.install(model, enabled=True)
    assert (applied > 0) == small_rows.usable()
    assert fused_projections.install(loaded(lively, 4)[0], enabled=False) == 0

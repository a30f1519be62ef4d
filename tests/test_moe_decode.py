"""A mixture of experts (mlx-lm's qwen3_moe, the shape of Qwen3-Coder-30B-A3B) through mlxc's CUDA
decode path, on the CPU: the experts' gate/up stacked into one `gather_qmm`
(engine/cuda/fused_projections.py) give bit-identical logits in 4 and 8 bits, and the compiled
decode step (engine/cuda/compiled_decode.py), over stacked projections as the engine runs it on
CUDA, gives mlx-lm's greedy tokens for a lone sequence and a batch past a 256-position buffer,
and for a batch whose experts' rows are sorted (8 rows x 8 active experts: mlx-lm sorts from 64);
benchmarks/gpu_decode.py runs on a qwen3_moe folder.
The model is a tiny one made here: 16 experts, 8 active, one dense MLP layer among them."""

from __future__ import annotations

import pytest
from batch_decode import decode

from mlxc.engine.cuda import fused_projections, small_rows
from mlxc.engine.cuda.compiled_decode import CompiledDecode

VOCAB = 384
CONFIG = dict(model_type="qwen3_moe", hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
              num_experts=16, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[1],
              norm_topk_prob=True, rope_theta=10000.0, rms_norm_eps=1e-6,
              max_position_embeddings=1024, tie_word_embeddings=False, vocab_size=VOCAB)


def moe_model(bits: int | None):
    """The tiny qwen3_moe, its layer weights scaled up (so greedy answers follow the context,
    not a repeated token) and quantized with groups of 32."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.models import qwen3_moe

    mx.random.seed(3)
    model = qwen3_moe.Model(qwen3_moe.ModelArgs.from_dict(CONFIG))
    model.update(tree_unflatten([(k, v * 4.0 if ".layers." in k and v.ndim >= 2 else v)
                                 for k, v in tree_flatten(model.parameters())]))
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    mx.eval(model.parameters())
    return model


def prompt(i: int, length: int = 24) -> list[int]:
    return [(7 * j + 13 * i + 5) % VOCAB for j in range(length)]


def greedy(model, ids, count):
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    return [int(t) for t, _ in generate_step(mx.array(ids), model, max_tokens=count)]


def weight_bytes(model):
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


@pytest.mark.parametrize("bits", [4, 8])
def test_stacked_expert_projections_give_bit_identical_logits(bits):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    model = moe_model(bits)
    ids = mx.array([prompt(0, 40), prompt(1, 40)])  # 80 expert rows a layer: the sorted path
    short = mx.array([prompt(2, 3)])  # 24: the unsorted one
    want, want_short = model(ids), model(short)
    before = weight_bytes(model)
    # each layer's q/k/v, and gate/up: the experts' in layers 0 and 2, the dense MLP's in 1
    assert fused_projections.fuse(model) == 2 * len(model.layers)
    assert weight_bytes(model) == before  # stacked, not copied beside the originals
    experts = model.layers[0].mlp.switch_mlp
    assert type(experts.gate_up_stacked) is QuantizedSwitchLinear
    assert experts.gate_up_stacked.weight.shape[:2] == (16, 64)  # 16 experts, 2 x 32 outputs
    assert type(model.layers[0].self_attn.q_k_v_stacked) is nn.QuantizedLinear
    assert mx.array_equal(model(ids), want)
    assert mx.array_equal(model(short), want_short)


def test_plain_experts_are_left_as_they_are():
    """Unquantized weights do not stack exactly (BLAS blocks by the output count): a plain
    model keeps mlx-lm's layers."""
    from mlx_lm.models.switch_layers import SwitchLinear

    model = moe_model(None)
    assert fused_projections.fuse(model) == 0
    assert type(model.layers[0].mlp.switch_mlp.gate_proj) is SwitchLinear


def test_an_expert_projection_called_with_other_experts_computes_its_own():
    """Stacked members are keyed on the input and the expert indices together: the same
    input with other experts (or the other order) is not served the last call's pieces."""
    import mlx.core as mx

    model = moe_model(4)
    experts = model.layers[0].mlp.switch_mlp
    x = mx.expand_dims(mx.random.normal((1, 2, 64)), (-2, -3))
    some, others = mx.array([[[0, 3], [5, 7]]]), mx.array([[[1, 2], [4, 6]]])
    want = [experts.up_proj(x, some), experts.gate_proj(x, others),
            experts.gate_proj(x, some), experts.up_proj(x, some, sorted_indices=False)]
    fused_projections.fuse(model)
    got = [experts.up_proj(x, some), experts.gate_proj(x, others),
           experts.gate_proj(x, some), experts.up_proj(x, some, sorted_indices=False)]
    assert all(mx.array_equal(a, b) for a, b in zip(got, want, strict=True))


def test_a_lone_sequence_decodes_compiled_with_mlx_lm_s_tokens_past_256_positions():
    """The lone loop's step (one row over mlx-lm's KVCache) compiled over the stacked model, as
    the engine runs it on CUDA: mlx-lm's greedy tokens from 20 to 300 positions, in 4 bits."""
    model = moe_model(4)
    ids = prompt(4, 20)
    want = greedy(model, ids, 280)
    assert len(set(want)) > 20  # the answer follows the context: a wrong step would show
    fused_projections.fuse(model)
    compiled = CompiledDecode(model)
    assert greedy(compiled, ids, 280) == want
    assert compiled.failed is None and compiled.lone_steps >= 278 and compiled.traces == 2


@pytest.mark.parametrize("bits", [4, 8])
def test_a_compiled_batch_decodes_what_mlx_lm_decodes(bits):
    """mlx-lm's BatchGenerator over the compiled step and stacked experts: 8 rows x 8 active
    experts take mlx-lm's sorted gather, fewer rows its unsorted one, as sequences leave and
    one joins."""
    model = moe_model(bits)
    prompts = [prompt(10 + i, 6 + 3 * i) for i in range(8)]
    lengths = [14, 9, 16, 6, 12, 16, 8, 10]
    join = [(prompt(30, 11), 9)]
    want = decode(model, prompts, lengths, join)
    fused_projections.fuse(model)
    compiled = CompiledDecode(model)
    got = decode(compiled, prompts, lengths, join)
    assert compiled.failed is None and compiled.steps > 10
    assert got == want


def test_the_gpu_benchmark_runs_every_decode_and_engine_row_on_a_moe_folder(tiny_model, tmp_path):
    """benchmarks/gpu_decode.py on a qwen3_moe folder (the tiny one, with the tiny llama's
    tokenizer): every decode variant (off CUDA, all but the kernel's), mlxc's engine, the MoE
    targets, and no part failing. A check that the parts run, not figures."""
    import json
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from mlx_lm.utils import save_config, save_model

    folder = tmp_path / "moe"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model / name, folder)
    save_model(folder, moe_model(4))
    save_config({**CONFIG, "quantization": {"group_size": 32, "bits": 4}}, folder / "config.json")
    out = tmp_path / "report.json"
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_decode.py"
    done = subprocess.run(
        [sys.executable, str(script), str(folder), "--parts", "decode,engine", "--tokens", "4",
         "--repeat", "1", "--words", "3", "--json", str(out)],
        capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    assert "errors" not in report, report.get("errors")
    kernel = {"stacked+compiled+kernel 4-bit"} if small_rows.usable() else set()  # CUDA only
    assert set(report["decode"]) == {"mlx-lm 4-bit", "compiled 4-bit", "stacked+compiled 4-bit",
                                     "bfloat16 (dequantized)", "bfloat16 compiled", *kernel}
    assert all(row["one_stream"] > 0 and row["eight_streams"] > 0
               for row in report["decode"].values())
    assert not any(row.get("compiled_failed") for row in report["decode"].values())
    assert report["moe_targets"]["one_stream_vs_raw"] > 0
    assert len(report["engine"]) == 3 and "MoE, best 4-bit one stream" in done.stdout


def test_a_compiled_batch_grows_its_buffers_past_256_positions():
    model = moe_model(4)
    prompts = [prompt(40, 245), prompt(41, 200)]  # 245 + 30 crosses a 256-position buffer
    want = decode(model, prompts, [30, 30])
    fused_projections.fuse(model)
    compiled = CompiledDecode(model)
    assert decode(compiled, prompts, [30, 30]) == want
    assert compiled.failed is None and compiled.steps >= 29 and compiled.traces >= 2

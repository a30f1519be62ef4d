"""GGUF import of each architecture mlxc converts: a tiny random mlx-lm model (2 layers, hidden
64, 4 experts where it has them) is saved as an MLX folder and written as a GGUF the way
llama.cpp's convert_hf_to_gguf.py writes it — tensor names from the `gguf` package's own
TensorNameMap, Gemma's norms stored as 1 + w, Llama's Q/K rows permuted — and the converted
folder must give the folder's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_model import write_gguf_vocabulary

from mlxc.model.blas import load_optimised_blas

load_optimised_blas()  # before MLX is imported, as the engine does
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402

from mlxc.model.describe import describe_gguf  # noqa: E402
from mlxc.model.gguf import GGUFConversionError, convert_gguf  # noqa: E402

BASE = {"hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 96,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": False}
MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 32}
LLAMA3 = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192}
# name: (GGUF architecture, mlx-lm config, GGUF metadata beyond the common keys)
CASES = {
    "qwen3moe": ("qwen3moe", {**BASE, **MOE, "model_type": "qwen3_moe", "num_experts": 4,
                              "decoder_sparse_step": 1, "mlp_only_layers": [],
                              "norm_topk_prob": True, "rope_theta": 1e6},
                 {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 32}),
    "mixtral": ("llama", {**BASE, "model_type": "mixtral", "num_local_experts": 4,
                          "num_experts_per_tok": 2, "intermediate_size": 32},
                {"expert_count": 4, "expert_used_count": 2}),
    "mistral": ("llama", {**BASE, "model_type": "llama"}, {}),
    # Llama 3.1's rope scaling, written as llama.cpp does: a rope_freqs.weight tensor.
    "llama3.1": ("llama", {**BASE, "model_type": "llama", "rope_theta": 500000.0,
                           "rope_scaling": {**LLAMA3, "factor": 8.0}}, {}),
    # Llama 3.2's tied head; a context of 64 stretched 16 times, so that the 38-token prompt
    # turns the scaled pairs far from where unscaled ones would be (see test_gguf_llama3.py).
    "llama3.2": ("llama", {**BASE, "model_type": "llama", "tie_word_embeddings": True,
                           "rope_scaling": {**LLAMA3, "factor": 16.0,
                                            "original_max_position_embeddings": 64}}, {}),
    "gemma": ("gemma", {**BASE, "model_type": "gemma", "tie_word_embeddings": True}, {}),
    "gemma2": ("gemma2", {**BASE, "model_type": "gemma2", "attn_logit_softcapping": 20.0,
                          "final_logit_softcapping": 10.0, "query_pre_attn_scalar": 16,
                          "tie_word_embeddings": True},
               {"attn_logit_softcapping": 20.0, "final_logit_softcapping": 10.0}),
    # 6 layers: llama.cpp's gemma3 makes every 6th global, the rest see a window of 8.
    "gemma3": ("gemma3", {**BASE, "model_type": "gemma3_text", "num_hidden_layers": 6,
                          "query_pre_attn_scalar": 16, "sliding_window": 8,
                          "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0,
                          "rope_theta": 1e6, "rope_scaling": {"rope_type": "linear",
                                                              "factor": 8.0}},
               {"attention.sliding_window": 8, "rope.scaling.type": "linear",
                "rope.scaling.factor": 8.0}),
    # Phi-4-mini's shape: 3/4 of each head rotated.
    "phi3": ("phi3", {**BASE, "model_type": "phi3", "num_key_value_heads": 4,
                      "partial_rotary_factor": 0.75}, {"rope.dimension_count": 12}),
    # Phi-3.5's 128k: LongRoPE factors as tensors (rope_factors_long/short).
    "phi3-longrope": ("phi3", {**BASE, "model_type": "phi3", "num_key_value_heads": 4,
                               "original_max_position_embeddings": 64, "rope_scaling": {
                                   "type": "longrope", "long_factor": [1.0, 1.5, 2, 3, 4, 6, 8, 9],
                                   "short_factor": [1.0, 1, 1, 1.2, 1.4, 1.6, 1.8, 2]}},
                      {"rope.scaling.original_context_length": 64}),
}
PROMPT = "Hello, GGUF! 12345 and some more words"  # 38 byte tokens: past gemma3's window


def _hf_name(name: str, model_type: str) -> str:
    """mlx-lm's name -> the Hugging Face name llama.cpp's TensorNameMap knows."""
    if model_type == "mixtral":
        for mine, theirs in (("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")):
            name = name.replace(f"switch_mlp.{mine}", f"experts.{theirs}")
    return name.replace("switch_mlp.", "experts.")


def llama_cpp_rope_freqs(config: dict) -> np.ndarray:
    """rope_freqs.weight as llama.cpp's convert_hf_to_gguf.py (LlamaModel) computes it from a
    llama3 rope_scaling, step by step in float32 (its torch code, in numpy)."""
    scaling, dim = config["rope_scaling"], config["head_dim"]
    base = np.float32(config["rope_theta"])
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)))
    factor, low, high = (scaling[k] for k in ("factor", "low_freq_factor", "high_freq_factor"))
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    rope_factors = []
    for freq in freqs:
        wavelen = np.float32(2 * np.pi) / freq
        if wavelen < high_freq_wavelen:
            rope_factors.append(1)
        elif wavelen > low_freq_wavelen:
            rope_factors.append(factor)
        else:
            smooth = (np.float32(old_context_len) / wavelen - low) / (high - low)
            rope_factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(rope_factors, np.float32)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute: Q/K rows reordered for its interleaved rotary."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def _make(tmp_path, case: str, spm: bool = False, experts: T | None = None,
          one_by_one: bool = False, extra_tensors: dict | None = None):
    """(MLX folder, GGUF) holding the same random weights; `one_by_one` writes experts as
    older Mixtral files do (blk.N.ffn_up.E), not stacked; `extra_tensors` go into the GGUF
    only (name -> float32 array; None drops a tensor _make would write)."""
    import importlib

    import mlx.core as mx
    from gguf.quants import dequantize, quantize
    from mlx.utils import tree_flatten

    arch, config, extra = CASES[case]
    path = tmp_path / f"{case}.gguf"
    writer = gguf.GGUFWriter(str(path), arch)
    config = {**config, "vocab_size": write_gguf_vocabulary(writer, spm)}
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = module.Model(module.ModelArgs.from_dict(config))
    mx.random.seed(0)
    weights = {k: np.array(mx.random.normal(v.shape) * 0.2)
               for k, v in tree_flatten(model.parameters())}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config["num_hidden_layers"])
    for name, value in weights.items():
        gguf_name = names.get_name(_hf_name(name, config["model_type"]), (".weight", ".bias"))
        assert gguf_name, name
        kind = T.F32
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            value = value + 1  # convert_hf_to_gguf's Gemma models: norm_shift
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            value = _permute(value, heads)
        # Q5_0 leaves the down experts float, as a Q4_K_M file holds some in Q6_K.
        if experts is not None and "switch_mlp" in name and not (
                experts == T.Q5_0 and "down_proj" in name):
            value, kind = quantize(value, experts), experts  # kept packed, 3-D
            weights[name] = dequantize(value, experts)  # the folder holds the same values
        if one_by_one and "_exps." in gguf_name:
            for e, expert in enumerate(value):
                writer.add_tensor(gguf_name.replace("_exps.", f".{e}."), expert, raw_dtype=kind)
        else:
            writer.add_tensor(gguf_name, value, raw_dtype=kind)
    if (config.get("rope_scaling") or {}).get("type") == "longrope":
        for key in ("long", "short"):
            factors = np.array(config["rope_scaling"][f"{key}_factor"], np.float32)
            writer.add_tensor(f"rope_factors_{key}.weight", factors)
    added = {}
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        added["rope_freqs.weight"] = llama_cpp_rope_freqs(config)
    for name, value in {**added, **(extra_tensors or {})}.items():
        if value is not None:
            writer.add_tensor(name, np.asarray(value, np.float32))
    meta = {"block_count": config["num_hidden_layers"], "context_length": 512,
            "embedding_length": 64, "feed_forward_length": config["intermediate_size"],
            "attention.head_count": 4, "attention.head_count_kv": config["num_key_value_heads"],
            "attention.key_length": 16, "attention.value_length": 16,
            "attention.layer_norm_rms_epsilon": 1e-6, "rope.freq_base": config["rope_theta"],
            **extra}
    for key, value in meta.items():
        add = {int: writer.add_uint32, float: writer.add_float32, str: writer.add_string}
        add[type(value)](f"{arch}.{key}", value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    folder = tmp_path / f"{case}-mlx"
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k: mx.array(v) for k, v in weights.items()})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, path


def _logits(folder, tokens):
    import mlx.core as mx
    from mlx_lm.utils import load_model

    model, _ = load_model(folder)
    return np.array(model(mx.array([tokens])).astype(mx.float32))


@pytest.mark.parametrize("case", list(CASES))
def test_gguf_gives_the_logits_of_the_same_weights_as_an_mlx_folder(tmp_path, case):
    from mlx_lm import load

    folder, path = _make(tmp_path, case)
    assert describe_gguf(path).problems == []
    converted = convert_gguf(path, tmp_path / f"{case}-converted")
    _, tokenizer = load(str(converted))
    tokens = tokenizer.encode(PROMPT, add_special_tokens=False)
    assert len(tokens) == len(PROMPT) and tokenizer.decode(tokens) == PROMPT
    expected, got = _logits(folder, tokens), _logits(converted, tokens)
    error = float(np.abs(got - expected).max())
    print(f"{case}: max abs logit error {error:.2e} (logits up to {np.abs(expected).max():.1f})")
    assert error < 1e-4, case
    config = json.loads((converted / "config.json").read_text())
    source = {**CASES[case][1], "vocab_size": config["vocab_size"]}
    assert set(source) - set(config) <= {"head_dim"}  # mixtral, phi3: mlx-lm derives it
    assert {k: config[k] for k in source if k in config} == {
        k: v for k, v in source.items() if k in config}


@pytest.mark.parametrize("kind", [T.Q4_0, T.Q5_0], ids=lambda k: k.name)
def test_qwen3moe_experts_stay_packed_as_mlx_quantized_switch_layers(tmp_path, kind):
    """Quantized experts ([expert, out, in]) are kept packed, read by MLX (Q4_0) or repacked
    (Q5_0, beside float down experts); the router stays float."""
    folder, path = _make(tmp_path, "qwen3moe", experts=kind)
    converted = convert_gguf(path, tmp_path / "converted")
    config = json.loads((converted / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": {"Q4_0": 4, "Q5_0": 5}[kind.name]}
    from mlx_lm.utils import load_model

    model, _ = load_model(converted)
    switch = model.model.layers[0].mlp.switch_mlp
    assert type(switch.up_proj).__name__ == "QuantizedSwitchLinear"
    assert type(switch.down_proj).__name__ == (
        "SwitchLinear" if kind == T.Q5_0 else "QuantizedSwitchLinear")
    tokens = list(range(3, 40))
    error = float(np.abs(_logits(converted, tokens) - _logits(folder, tokens)).max())
    print(f"qwen3moe {kind.name} experts: max abs logit error {error:.2e}")
    assert error < 2e-3  # scales and biases are float16


def test_experts_written_one_by_one_are_stacked(tmp_path):
    folder, path = _make(tmp_path, "mixtral", one_by_one=True)
    converted = convert_gguf(path, tmp_path / "converted")
    tokens = list(range(3, 40))
    assert np.abs(_logits(converted, tokens) - _logits(folder, tokens)).max() < 1e-4


def test_large_models_are_written_in_shards_with_progress_in_bytes(tmp_path, monkeypatch):
    import mlxc.model.gguf as conversion

    monkeypatch.setattr(conversion, "SHARD_BYTES", 100_000)
    folder, path = _make(tmp_path, "qwen3moe")
    said: list[str] = []
    converted = convert_gguf(path, tmp_path / "converted", progress=said.append)
    shards = sorted(p.name for p in converted.glob("*.safetensors"))
    index = json.loads((converted / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and sorted(set(index["weight_map"].values())) == shards
    writing = [m for m in said if m.startswith("writing weights")]
    done, total = writing[-1].removeprefix("writing weights ").split(" / ")
    assert len(writing) == len(shards) + 1 and done == total == "0.4 MB"
    tokens = list(range(3, 40))
    assert np.abs(_logits(converted, tokens) - _logits(folder, tokens)).max() < 1e-4


def test_a_disk_without_room_is_refused_before_any_weight_is_read(tmp_path, monkeypatch):
    import shutil

    _folder, path = _make(tmp_path, "gemma")
    full = shutil.disk_usage(tmp_path)._replace(free=300_000)
    monkeypatch.setattr(shutil, "disk_usage", lambda _path: full)
    said: list[str] = []
    with pytest.raises(GGUFConversionError, match=r"needs about .* MB in .* only 0.3 MB is free"):
        convert_gguf(path, tmp_path / "models" / "gemma", progress=said.append)
    assert said == [] and list((tmp_path / "models").iterdir()) == []


@pytest.mark.parametrize("case", ["mixtral", "gemma2", "phi3"])
def test_sentencepiece_vocabularies_are_rebuilt(tmp_path, case):
    from mlx_lm import load

    _folder, path = _make(tmp_path, case, spm=True)
    converted = convert_gguf(path, tmp_path / "converted")
    _, tokenizer = load(str(converted))
    tokens = tokenizer.encode(PROMPT)
    assert tokens[0] == 1  # <s>: llama.cpp adds BOS to a sentencepiece vocabulary
    assert tokenizer.decode(tokens, skip_special_tokens=True) == PROMPT


def test_unknown_architecture_is_refused_from_the_header_by_name(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "mamba.gguf"), "mamba")
    write_gguf_vocabulary(writer)
    writer.add_tensor("token_embd.weight", np.zeros((259, 64), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    problems = describe_gguf(tmp_path / "mamba.gguf").problems
    assert problems and "'mamba'" in problems[0] and "qwen3moe" in problems[0]
    with pytest.raises(GGUFConversionError, match="'mamba'.*qwen3moe"):
        convert_gguf(tmp_path / "mamba.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()

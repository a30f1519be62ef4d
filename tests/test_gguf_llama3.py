"""Llama 3.x GGUFs: rope_freqs.weight (llama.cpp's form of the llama3 rope scaling) mapped back
to mlx-lm's rope_scaling, exactly or not at all; tensors nothing reads are refused by name;
llama.cpp's 'llama-bpe' pre-tokenizer splits digits as Llama 3's does. The logits of each
Llama 3 shape against its MLX folder are in test_gguf_architectures.py (llama3.1, llama3.2)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mlxc.model.blas import load_optimised_blas

load_optimised_blas()  # before MLX is imported, as the engine does
pytest.importorskip("gguf")
from test_gguf_architectures import (  # noqa: E402
    CASES,
    PROMPT,
    _logits,
    _make,
    llama_cpp_rope_freqs,
)

from mlxc.model.describe import describe_gguf  # noqa: E402
from mlxc.model.gguf import GGUFConversionError, convert_gguf  # noqa: E402
from mlxc.model.gguf_rope import llama3_scaling, rotates_as_llama_cpp  # noqa: E402


def _scaling(factor, low, high, original):
    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original}


@pytest.mark.parametrize(("base", "dim", "scaling", "found"), [
    # Llama 3.1 8B / 3.3 70B and Llama 3.2 1B / 3B, as their config.json have them.
    (500000.0, 128, _scaling(8.0, 1.0, 4.0, 8192), _scaling(8.0, 1.0, 4.0, 8192)),
    (500000.0, 64, _scaling(32.0, 1.0, 4.0, 8192), _scaling(32.0, 1.0, 4.0, 8192)),
    # Parameters off the defaults are fitted; the tensor fixes only L / low and L / high,
    # so low = 0.5, high = 2, L = 32 comes back as the same scaling with low = 1.
    (10000.0, 16, _scaling(16.0, 0.5, 2.0, 32), _scaling(16.0, 1.0, 4.0, 64)),
    (500000.0, 128, _scaling(4.0, 1.0, 2.5, 16384), _scaling(4.0, 1.0, 2.5, 16384)),
])
def test_rope_freqs_map_back_to_the_llama3_parameters(base, dim, scaling, found):
    factors = llama_cpp_rope_freqs({"rope_scaling": scaling, "head_dim": dim,
                                    "rope_theta": base})
    assert llama3_scaling(factors, base, dim) == found
    assert rotates_as_llama_cpp(found, factors, base, dim)


def test_factors_that_no_parameters_give_are_not_matched():
    factors = llama_cpp_rope_freqs({"rope_scaling": _scaling(8.0, 1.0, 4.0, 8192),
                                    "head_dim": 128, "rope_theta": 500000.0})
    assert llama3_scaling(np.ones(64), 500000.0, 128) == {}  # nothing scaled
    bumped = factors.copy()
    bumped[40] *= 1.01
    assert llama3_scaling(bumped, 500000.0, 128) is None
    assert llama3_scaling(factors[:32], 500000.0, 128) is None  # one per rotated pair
    assert llama3_scaling(np.random.default_rng(0).uniform(1, 8, 64), 500000.0, 128) is None


def test_scaled_rope_changes_the_logits_so_the_match_is_checked(tmp_path):
    """llama3.2's case would fail test_gguf_architectures if the scaling were lost: the same
    weights without it are far from the scaled model's logits (and the converted ones)."""
    import mlx.core as mx  # noqa: F401  (after the BLAS preload)

    folder, path = _make(tmp_path, "llama3.2")
    converted = convert_gguf(path, tmp_path / "converted")
    config = json.loads((converted / "config.json").read_text())
    assert config["rope_scaling"] == CASES["llama3.2"][1]["rope_scaling"]
    tokens = [3 + ord(c) for c in PROMPT]
    expected = _logits(folder, tokens)
    plain = tmp_path / "unscaled"
    plain.mkdir()
    (plain / "model.safetensors").symlink_to(folder / "model.safetensors")
    source = json.loads((folder / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**source, "rope_scaling": None}))
    lost = float(np.abs(_logits(plain, tokens) - expected).max())
    error = float(np.abs(_logits(converted, tokens) - expected).max())
    print(f"llama3.2: max abs logit error {error:.2e}; without the scaling {lost:.2e}")
    assert error < 1e-4 < 1e-2 < lost


def test_a_rope_freqs_no_llama3_scaling_gives_is_refused_by_name(tmp_path):
    factors = llama_cpp_rope_freqs(CASES["llama3.1"][1])
    factors[6] *= 1.05
    _folder, path = _make(tmp_path, "llama3.1", extra_tensors={"rope_freqs.weight": factors})
    assert describe_gguf(path).problems == ["rope_freqs.weight matches no Llama 3 rope scaling"]
    with pytest.raises(GGUFConversionError, match="rope_freqs.weight .*no Llama 3 rope scaling"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_all_one_rope_freqs_scale_nothing(tmp_path):
    folder, path = _make(tmp_path, "mistral", extra_tensors={"rope_freqs.weight": np.ones(8)})
    assert describe_gguf(path).problems == []
    converted = convert_gguf(path, tmp_path / "converted")
    assert "rope_scaling" not in json.loads((converted / "config.json").read_text())
    tokens = list(range(3, 40))
    assert np.abs(_logits(converted, tokens) - _logits(folder, tokens)).max() < 1e-4


@pytest.mark.parametrize(("case", "name", "why"), [
    ("gemma2", "rope_freqs.weight", "reads only for Llama 3, not for mlx-lm's gemma2"),
    ("mixtral", "rope_freqs.weight", "reads only for Llama 3, not for mlx-lm's mixtral"),
    ("phi3", "rope_factors_short.weight", "without rope_factors_long.weight"),
    ("qwen3moe", "blk.0.ffn_gate_inp_shexp.weight", "unexpected tensor"),
    ("gemma3", "blk.1.attn_sinks.weight", "unexpected tensor"),
])
def test_a_tensor_nothing_reads_is_refused_by_name(tmp_path, case, name, why):
    """Every tensor of the file becomes a weight or a setting; any other stops the import."""
    _folder, path = _make(tmp_path, case, extra_tensors={name: np.ones(8)})
    with pytest.raises(GGUFConversionError, match=f"{name.replace('.', '[.]')}.*{why}|"
                                                  f"{why}.*{name.replace('.', '[.]')}"):
        convert_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_llama_bpe_pretokenizer_splits_digits_by_threes():
    from mlxc.model.gguf_tokenizer import _byte_level

    def pieces(pre: str) -> list[str]:
        meta = {"tokenizer.ggml.pre": pre, "tokenizer.ggml.merges": []}
        tok = _byte_level(meta, ["a"], [1])
        return [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("in 1234567 years")]

    assert pieces("llama-bpe") == ["in", "Ġ", "123", "456", "7", "Ġyears"]
    assert pieces("qwen2") == ["in", "Ġ", "1", "2", "3", "4", "5", "6", "7", "Ġyears"]

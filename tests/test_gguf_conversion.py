"""GGUF -> MLX conversion: the real SmolLM2-135M-Instruct GGUF (the default model) must convert
into a folder mlx-lm loads *and* that predicts text well (a wrong rotary layout still loads but
scores ~3.9 nats/token and answers nothing); broken files must fail cleanly."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mlxc.model.gguf import GGUFConversionError, convert_gguf

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of "
    "France. It is known for the Eiffel Tower, which was built for the 1889 World's Fair."
)


@pytest.fixture(scope="session")
def smollm(smollm_folder):
    from mlx_lm import load

    return load(str(smollm_folder))


@pytest.mark.smollm
def test_folder_layout_and_config(smollm_folder):
    names = {p.name for p in smollm_folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert not [p for p in smollm_folder.parent.iterdir() if p.name.endswith(".tmp")]
    config = json.loads((smollm_folder / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert (config["hidden_size"], config["num_hidden_layers"]) == (576, 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["rope_theta"] == 100000.0
    assert config["vocab_size"] == 49152
    # 4-bit everywhere except the 8-bit token embedding, and nothing else listed
    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "model.embed_tokens": {"group_size": 32, "bits": 8},
    }
    tok_config = json.loads((smollm_folder / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"]


@pytest.mark.smollm
def test_tokenizer_is_sane(smollm):
    _, tokenizer = smollm
    ids = tokenizer.encode("The capital of France", add_special_tokens=False)
    assert len(ids) <= 6
    for text in ("The capital of France", "Hello world 12345", "café 東京\n\tdef f(x):", TEXT):
        assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    assert len(tokenizer.encode(TEXT, add_special_tokens=False)) == 43
    # control tokens are single ids and the chat template ends on the assistant turn
    assert tokenizer.encode("<|im_start|>user", add_special_tokens=False)[0] == 1
    assert tokenizer.eos_token == "<|im_end|>"
    assert 2 in tokenizer.eos_token_ids
    messages = [{"role": "user", "content": "Hi"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.smollm
def test_cross_entropy_shows_the_right_rotary_layout(smollm):
    import mlx.core as mx
    import mlx.nn as nn

    model, tokenizer = smollm
    ids = mx.array(tokenizer.encode(TEXT, add_special_tokens=False))[None]
    logits = model(ids[:, :-1]).astype(mx.float32)
    loss = nn.losses.cross_entropy(logits, ids[:, 1:]).mean().item()
    print(f"mean cross-entropy {loss:.3f} nats/token")
    # right layout ~1.9; llama.cpp's rotary layout read the wrong way ~3.9; random ~10.8
    assert loss < 3.0 < math.log(49152)


@pytest.mark.smollm
def test_greedy_answer_names_paris(smollm):
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = smollm
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    answer = generate(model, tokenizer, prompt, max_tokens=20, sampler=make_sampler(temp=0.0))
    assert "Paris" in answer


def _assert_nothing_left(parent: Path, *keep: str) -> None:
    assert sorted(p.name for p in parent.iterdir()) == sorted(keep)


@pytest.mark.parametrize(
    "content", [b"", b"hello, not a model\n", b"GGUF\x03\x00\x00\x00garbage"], ids=str
)
def test_non_gguf_raises_and_leaves_no_folder(tmp_path, content):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(content)
    with pytest.raises(GGUFConversionError, match="GGUF|damaged"):
        convert_gguf(bad, tmp_path / "out")
    _assert_nothing_left(tmp_path, "model.gguf")


def test_other_architecture_is_refused(tmp_path):
    import mlx.core as mx

    path = tmp_path / "mamba.gguf"
    mx.save_gguf(
        str(path), {"token_embd.weight": mx.zeros((4, 8))}, {"general.architecture": "mamba"}
    )
    with pytest.raises(GGUFConversionError, match="'mamba'.*llama, qwen2, qwen3, qwen3moe"):
        convert_gguf(path, tmp_path / "out")
    _assert_nothing_left(tmp_path, "mamba.gguf")


def test_missing_file_raises(tmp_path):
    with pytest.raises(GGUFConversionError, match="cannot read"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "out")


@pytest.mark.smollm
def test_truncated_gguf_raises_and_leaves_no_folder(smollm_gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    with open(smollm_gguf, "rb") as src, open(cut, "wb") as dst:
        dst.write(src.read(5_000_000))  # metadata intact, tensor data cut short
    with pytest.raises(GGUFConversionError, match="damaged or incomplete"):
        convert_gguf(cut, tmp_path / "out")
    _assert_nothing_left(tmp_path, "cut.gguf")


@pytest.mark.smollm
def test_interrupted_conversion_leaves_no_folder(smollm_gguf, tmp_path, monkeypatch):
    import mlxc.model.gguf as gguf

    def ctrl_c(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf, "_fix_tokenizer_config", ctrl_c)  # after the weights are written
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(smollm_gguf, tmp_path / "out")
    _assert_nothing_left(tmp_path)


@pytest.mark.smollm
def test_existing_half_folder_is_replaced(smollm_gguf, smollm_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"half")  # no config.json: a broken leftover
    convert_gguf(smollm_gguf, out)
    assert (out / "config.json").is_file()
    size = (smollm_folder / "model.safetensors").stat().st_size
    assert (out / "model.safetensors").stat().st_size == size

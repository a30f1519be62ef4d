"""GGUF import against the `gguf` package (llama.cpp's own reader) as the reference: every
quantization type mlxc accepts comes out with the reference's values, types it cannot read
exactly are refused by name, and tiny qwen2/qwen3 GGUFs written here convert into folders
whose logits equal the model they were written from."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_model import write_gguf_vocabulary

from mlxc.model.blas import load_optimised_blas

load_optimised_blas()  # before MLX is imported, as the engine does
gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as T  # noqa: E402
from gguf.quants import dequantize, quantize  # noqa: E402

from mlxc.model.gguf import GGUFConversionError, _read, convert_gguf  # noqa: E402
from mlxc.model.gguf_pack import BITS  # noqa: E402
from mlxc.model.gguf_tensors import DEQUANTIZED  # noqa: E402

# Where each K-quant and i-quant block keeps its float16 scales (the rest is packed bits and
# sub-scales, any byte value valid): random bytes there could be inf/nan, so sane values are put in.
K_SCALES = {T.Q2_K: (80, 82), T.Q3_K: (108,), T.Q4_K: (0, 2), T.Q5_K: (0, 2), T.Q6_K: (208,),
            **{kind: (0,) for kind in (T.IQ2_XXS, T.IQ2_XS, T.IQ2_S, T.IQ3_XXS, T.IQ3_S,
                                       T.IQ1_S, T.IQ4_NL, T.IQ4_XS)}}
QUANTIZABLE = {T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.BF16, T.TQ1_0, T.TQ2_0, T.MXFP4}
ROWS, COLS = 8, 512


def blocks(kind: T, rng: np.random.Generator) -> np.ndarray:
    """A quantized (ROWS, COLS) tensor: quantized by the gguf package where it can, else
    random blocks with sane scales (it has no quantizer for those)."""
    if kind in QUANTIZABLE:
        return quantize(rng.standard_normal((ROWS, COLS)).astype(np.float32), kind)
    size, nbytes = gguf.GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, (ROWS, COLS // size, nbytes), dtype=np.uint8)
    for offset in K_SCALES.get(kind, ()):
        scale = (rng.random((ROWS, COLS // size)) * 0.02 + 0.001).astype(np.float16)
        raw[:, :, offset : offset + 2] = scale.view(np.uint8).reshape(ROWS, COLS // size, 2)
    if kind == T.IQ1_M:  # its float16 scale is the top 4 bits of its last four uint16s
        raw[:, :, -7:-1:2] &= 0x0F
        raw[:, :, -1] = (raw[:, :, -1] & 0x0F) | 0x20  # 0x2000: 2**-7
    if kind == T.NVFP4:  # four FP8 (E4M3) sub-block scales first: 1.0 each
        raw[:, :, :4] = 0x38
    return raw.reshape(ROWS, -1)


def write(path, tensors: dict[str, tuple[np.ndarray, T]], arch: str = "llama") -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def as_float(tensors: dict, name: str) -> np.ndarray:
    """An imported tensor's values, unpacking MLX's quantized form where it was kept."""
    import mlx.core as mx

    base = name.removesuffix(".weight")
    weight = tensors[name]
    if f"{base}.scales" in tensors:
        scales, biases = tensors[f"{base}.scales"], tensors[f"{base}.biases"]
        bits = weight.shape[-1] * 32 // (scales.shape[-1] * 32)
        weight = mx.dequantize(weight, scales, biases, group_size=32, bits=bits)
    return np.array(weight.astype(mx.float32))


def test_mlx_exact_types_stay_packed_and_equal_the_reference(tmp_path):
    rng = np.random.default_rng(0)
    kinds = [T.Q4_0, T.Q4_1, T.Q8_0]
    tensors = {f"blk.{i}.attn_q.weight": (blocks(k, rng), k) for i, k in enumerate(kinds)}
    tensors["output_norm.weight"] = (rng.standard_normal(COLS).astype(np.float32), T.F32)
    write(tmp_path / "exact.gguf", tensors)
    imported, _meta = _read(tmp_path / "exact.gguf")
    for name, (data, kind) in tensors.items():
        reference = dequantize(data, kind) if kind != T.F32 else data
        if kind != T.F32:
            assert imported[name].dtype.size == 4 and f"{name[:-7]}.scales" in imported  # packed
        # MLX keeps a float16 bias (-8 d for Q4_0): within float16 rounding of the largest.
        error = np.abs(as_float(imported, name) - reference).max()
        assert error <= 1e-3 * np.abs(reference).max(), kind.name


@pytest.mark.parametrize("kind", sorted(T[name] for name in DEQUANTIZED), ids=lambda k: k.name)
def test_other_types_are_dequantized_like_the_reference(tmp_path, kind):
    rng = np.random.default_rng(1)
    data = blocks(kind, rng)
    exact = blocks(T.Q4_0, rng)  # an MLX type in the same file: read the same way as the rest
    write(tmp_path / "k.gguf", {"blk.0.ffn_up.weight": (data, kind),
                                "blk.0.ffn_down.weight": (exact, T.Q4_0)})
    imported, _meta = _read(tmp_path / "k.gguf")
    reference = dequantize(data, kind)
    got = as_float(imported, "blk.0.ffn_up.weight")
    assert got.shape == reference.shape == (ROWS, COLS)
    scale = np.abs(reference).max()
    assert np.abs(got - reference).max() <= 1e-3 * scale, kind.name
    got = as_float(imported, "blk.0.ffn_down.weight")
    assert np.abs(got - dequantize(exact, T.Q4_0)).max() <= 1e-3 * np.abs(got).max()


@pytest.mark.parametrize("kind", sorted(T[name] for name in BITS), ids=lambda k: k.name)
def test_affine_types_are_repacked_into_mlx_layout_like_the_reference(tmp_path, kind):
    """Read by the gguf package (a Q6_K tensor beside it), kept packed: MLX's uint32 words and
    a scale and bias per 32 values, dequantizing to the reference's values."""
    import mlx.core as mx

    rng = np.random.default_rng(3)
    data = blocks(kind, rng)
    write(tmp_path / "p.gguf", {"blk.0.ffn_up.weight": (data, kind),
                                "blk.0.ffn_down.weight": (blocks(T.Q6_K, rng), T.Q6_K)})
    imported, _meta = _read(tmp_path / "p.gguf")
    weight, scales = imported["blk.0.ffn_up.weight"], imported["blk.0.ffn_up.scales"]
    assert weight.dtype == mx.uint32 and weight.shape == (ROWS, COLS * BITS[kind.name] // 32)
    assert scales.shape == (ROWS, COLS // 32)
    reference = dequantize(data, kind)
    error = np.abs(as_float(imported, "blk.0.ffn_up.weight") - reference).max()
    assert error <= 1e-3 * np.abs(reference).max(), kind.name  # float16 scales and biases


def test_types_without_an_exact_reader_are_refused_by_name(tmp_path):
    rng = np.random.default_rng(2)
    size, nbytes = gguf.GGML_QUANT_SIZES[T.Q8_K]  # llama.cpp's scratch type: no dequantizer
    raw = rng.integers(0, 256, (ROWS, COLS // size * nbytes), dtype=np.uint8)
    write(tmp_path / "q8k.gguf", {"blk.0.ffn_up.weight": (raw, T.Q8_K)})
    with pytest.raises(GGUFConversionError, match="Q8_K"):
        _read(tmp_path / "q8k.gguf")


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_gguf_converts_into_the_model_it_was_written_from(tmp_path, arch):
    import importlib

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
             "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
             "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm"}
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    writer = gguf.GGUFWriter(str(tmp_path / f"{arch}.gguf"), arch)
    vocab = write_gguf_vocabulary(writer, chat_template=(
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}"))
    config = {"model_type": arch, "hidden_size": 64, "num_hidden_layers": 2,
              "intermediate_size": 96, "num_attention_heads": 4, "num_key_value_heads": 2,
              "head_dim": 16, "rms_norm_eps": 1e-6, "vocab_size": vocab, "rope_theta": 1e6,
              "max_position_embeddings": 512, "tie_word_embeddings": arch == "qwen2"}
    module = importlib.import_module(f"mlx_lm.models.{arch}")
    mx.random.seed(0)
    source = module.Model(module.ModelArgs.from_dict(config))
    source.load_weights([(k, mx.random.normal(v.shape) * 0.2)
                         for k, v in tree_flatten(source.parameters())])
    for key, value in (("block_count", 2), ("context_length", 512), ("embedding_length", 64),
                       ("feed_forward_length", 96), ("attention.head_count", 4),
                       ("attention.head_count_kv", 2), ("attention.key_length", 16)):
        writer.add_uint32(f"{arch}.{key}", value)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)
    writer.add_float32(f"{arch}.rope.freq_base", 1e6)
    for name, value in tree_flatten(source.parameters()):
        base, _, kind = name.rpartition(".")
        if base.startswith("model.layers."):
            _, _, i, rest = base.split(".", 3)
            gguf_name = f"blk.{i}.{names[rest]}.{kind}"
        else:
            gguf_name = f"{top[base]}.{kind}"
        writer.add_tensor(gguf_name, np.array(value.astype(mx.float32)), raw_dtype=T.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    folder = convert_gguf(tmp_path / f"{arch}.gguf", tmp_path / arch)
    model, tokenizer = load(str(folder))
    tokens = mx.array([tokenizer.encode("Hello, Qwen! 123", add_special_tokens=False)])
    assert tokenizer.decode(tokens[0].tolist()) == "Hello, Qwen! 123"
    assert tokens.shape[1] == 16  # every byte a token; digits and punctuation split apart
    assert mx.allclose(model(tokens), source(tokens), atol=1e-4).item()

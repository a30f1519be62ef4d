"""A tiny random llama with a real byte-level BPE tokenizer and chat template, made in
seconds with no network: for tests that need *a* model, not a good one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital and largest city of France.",
    "MLX is an array framework for machine learning on Apple silicon.",
    "What is the capital of France? Answer briefly, please.",
    "def add(a, b):\n    return a + b\n",
] * 20


def make_tiny_model(folder: Path, seed: int = 0, vocab_size: int = 384) -> Path:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(CORPUS, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)

    config = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(tokenizer),
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "max_position_embeddings": 1024,
    }
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Larger-than-default weights make greedy outputs vary with the prompt.
    model.update(
        {"model": {"embed_tokens": {"weight": mx.random.normal((len(tokenizer), 64))}}}
    )
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, folder / "config.json")
    assert tree_flatten(model.parameters())
    return folder


def rescaled_copy(source: Path, folder: Path, factor: float, config: dict | None = None) -> Path:
    """A copy of the tiny model with its layer weights scaled: the plain one mostly repeats
    the prompt's last token, which would hide a wrong state; scaled, answers use the context."""
    import mlx.core as mx

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".mlxc-fingerprint.json"))
    weights = mx.load(str(source / "model.safetensors"))
    weights = {
        k: v * factor if ".layers." in k and v.ndim == 2 else v for k, v in weights.items()
    }
    mx.save_safetensors(str(folder / "model.safetensors"), weights, {"format": "mlx"})
    if config:
        path = folder / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    return folder


def write_gguf_vocabulary(writer, spm: bool = False, chat_template: str | None = None) -> int:
    """A GGUF writer's vocabulary, every byte a token: byte-level BPE (ChatML's control tokens
    after), or a sentencepiece vocabulary of byte pieces (<0x41> ...) and '▁'; its size."""
    if spm:
        tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁"]
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores([0.0] * len(tokens))
        writer.add_token_types([2, 3, 3] + [6] * 256 + [1])  # unknown, control, byte, normal
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
        return len(tokens)
    from mlx_lm.tokenizer_utils import _byte_decoder

    tokens = sorted(_byte_decoder(), key=_byte_decoder().get)
    tokens += ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3, 3, 3])
    writer.add_token_merges([])
    writer.add_eos_token_id(len(tokens) - 1)
    if chat_template:
        writer.add_chat_template(chat_template)
    return len(tokens)

"""The tokenizer a GGUF describes in its metadata (vocabulary, merges, token types, special ids),
rebuilt as a Hugging Face fast tokenizer: byte-level BPE ('gpt2': Qwen, SmolLM, Llama 3, Phi-4)
here, sentencepiece ('llama': Mistral, Mixtral, Gemma, Phi-3) through transformers' own GGUF
builder. Every rebuilt tokenizer must give back the text it encoded, or the import stops."""

from __future__ import annotations

from mlxc.model.gguf_arch import GGUFConversionError

CONTROL, USER_DEFINED = 3, 4  # llama.cpp token types
TOKENIZERS = ("gpt2", "llama")  # tokenizer.ggml.model values rebuilt
# Qwen2's split regex (its tokenizer.json's): digits one by one, letters with one leading mark.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Llama 3's (its tokenizer.json's, llama.cpp's "llama-bpe"): the same with digits by threes.
LLAMA3_SPLIT = QWEN2_SPLIT.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
SPLITS = {"qwen2": QWEN2_SPLIT, "llama-bpe": LLAMA3_SPLIT}
ROUND_TRIP = ("The capital of France", " 1889 World's Fair.\n\tÉté 東京 🙂")


def _value(meta: dict, key: str, default=None):
    value = meta.get(key, default)
    return value.item() if hasattr(value, "item") else value  # scalars come as 0-d arrays


def build_tokenizer(meta: dict, arch: str, max_length: int | None):
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    kind = _value(meta, "tokenizer.ggml.model")
    if kind not in TOKENIZERS:
        raise GGUFConversionError(
            f"the GGUF's tokenizer is {kind!r}; only byte-level BPE ('gpt2') and sentencepiece "
            "('llama') tokenizers can be rebuilt. Use an MLX model folder or a Hugging Face "
            "repo id instead")
    tokens = list(meta["tokenizer.ggml.tokens"])
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [1] * len(tokens)
    tok = _byte_level(meta, tokens, types) if kind == "gpt2" else _sentencepiece(
        meta, arch, tokens, types)

    def token(key: str) -> str | None:
        token_id = _value(meta, f"tokenizer.ggml.{key}_token_id")
        return tokens[int(token_id)] if token_id is not None and token_id < len(tokens) else None

    bos = token("bos")
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    if _value(meta, "tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
        tok.post_processor = TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tokens.index(bos))])
    else:
        tok.post_processor = None
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
    for text in ROUND_TRIP:
        if kind == "llama":  # sentencepiece folds a leading space into its own '▁' prefix
            text = text.lstrip(" ")
        if hf.decode(hf.encode(text, add_special_tokens=False)) != text:
            raise GGUFConversionError(f"the tokenizer rebuilt from the GGUF garbles {text!r}")
    return hf


def _byte_level(meta: dict, tokens: list[str], types: list[int]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(m.split(" ", 1)) for m in meta.get("tokenizer.ggml.merges", [])]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    # GPT-2's split regex (ByteLevel's own); SmolLM's HF tokenizer first splits every digit.
    # Other pre-tokenizers (llama.cpp's tokenizer.ggml.pre) differ only in rare splits.
    steps = [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    if _value(meta, "tokenizer.ggml.pre") == "smollm":
        steps.insert(0, pre_tokenizers.Digits(individual_digits=True))
    elif (split := SPLITS.get(_value(meta, "tokenizer.ggml.pre"))) is not None:
        steps = [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tok.decoder = decoders.ByteLevel()
    # Control tokens (<|im_start|> ...) must match whole and are skipped when decoding.
    for kind, add in ((CONTROL, tok.add_special_tokens), (USER_DEFINED, tok.add_tokens)):
        chosen = [t for t, k in zip(tokens, types, strict=True) if k == kind]
        add([AddedToken(t, special=kind == CONTROL, normalized=False) for t in chosen])
    return tok


def _sentencepiece(meta: dict, arch: str, tokens: list[str], types: list[int]):
    try:  # transformers >= 5: per-architecture sentencepiece builders (Gemma's, Phi-3's)
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (
            convert_gguf_tokenizer,
        )
    except ImportError as exc:
        raise GGUFConversionError(
            "rebuilding a sentencepiece ('llama') GGUF tokenizer needs transformers 5 or newer "
            f"({exc}); upgrade it with `pip install -U transformers`") from exc
    scores = meta.get("tokenizer.ggml.scores")
    spec = {"tokenizer_type": "llama", "tokens": tokens, "token_type": types,
            "scores": scores.tolist() if scores is not None else [0.0] * len(tokens)}
    if merges := meta.get("tokenizer.ggml.merges"):
        spec["merges"] = list(merges)
    if (pre := _value(meta, "tokenizer.ggml.pre")) is not None:
        spec["pre_tokenizer_type"] = pre
    try:
        tok, _ = convert_gguf_tokenizer(arch, spec)
    except Exception as exc:  # its builders raise plain errors on odd vocabularies
        raise GGUFConversionError(f"the GGUF's sentencepiece tokenizer cannot be rebuilt: {exc}"
                                  ) from exc
    return tok

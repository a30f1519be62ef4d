"""One table per GGUF architecture: which mlx-lm model it becomes, how llama.cpp's tensor names
map onto that model's, and the config.json keys read from the GGUF metadata.

Tensor names are llama.cpp's (`gguf.constants.TENSOR_NAMES`); module names are mlx-lm's own
(`mlx_lm/models/<model_type>.py`). A llama-architecture file with experts is Mixtral; a plain
one is Llama or Mistral. Nothing here imports MLX."""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass, field


class GGUFConversionError(RuntimeError):
    """The GGUF cannot be fetched or converted; the message says why and what to do."""


ATTENTION = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_norm": "input_layernorm",
}
QK_NORM = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
DENSE = {"ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
         "ffn_norm": "post_attention_layernorm"}
# Gemma 2/3 norm around both halves of a block; llama.cpp's ffn_norm is the one before the MLP.
GEMMA_NORMS = {"post_attention_norm": "post_attention_layernorm",
               "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"}
TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
TIED = {k: v for k, v in TOP.items() if k != "output"}  # mlx-lm's gemma/gemma2 have no lm_head


def experts(block: str) -> dict[str, str]:
    """Router and stacked experts ([expert, out, in], as mlx-lm's SwitchGLU holds them)."""
    return {"ffn_gate_inp": f"{block}.gate",
            "ffn_gate_exps": f"{block}.switch_mlp.gate_proj",
            "ffn_up_exps": f"{block}.switch_mlp.up_proj",
            "ffn_down_exps": f"{block}.switch_mlp.down_proj"}


def short(value) -> float:
    """A float32 from the file as the shortest decimal that is the same float32 (1e-06, not
    9.999999974752427e-07), so config.json reads as the model's own."""
    value = float(value)
    for digits in range(6, 10):
        text = float(f"{value:.{digits}g}")
        if struct.pack("<f", text) == struct.pack("<f", value):
            return text
    return value


class Meta:
    """The GGUF metadata under one architecture's prefix (`qwen3moe.block_count` ...)."""

    def __init__(self, meta: dict, arch: str, file: str):
        self.meta, self.arch, self.file = meta, arch, file

    def get(self, key: str, default=None):
        value = self.meta.get(f"{self.arch}.{key}", default)
        return value.item() if hasattr(value, "item") else value  # 0-d arrays from mx.load

    def need(self, key: str):
        if (value := self.get(key)) is None:
            raise GGUFConversionError(
                f"{self.file} lacks the metadata {self.arch}.{key}; is it corrupt?")
        return value

    def refuse(self, why: str):
        raise GGUFConversionError(f"{self.file} {why}: not supported")


@dataclass(frozen=True)
class Architecture:
    model_type: str  # mlx-lm's
    layer: dict[str, str]  # blk.N.<GGUF name> -> model.layers.N.<mlx-lm module>
    # Keys beyond the common ones; may take (pop) tensors that are settings, not weights.
    extra: Callable[[Meta, dict], dict] = lambda meta, tensors: {}
    # llama.cpp permutes llama's Q/K rows for its interleaved rotary; MLX's traditional RoPE
    # rotates the same pairs, so those weights need no un-permuting. The others are stored as
    # trained, for the split-half ("neox") rotary: MLX's default.
    rope_traditional: bool = False
    norm_shift: float = 0.0  # llama.cpp stores Gemma's norms as 1 + w; mlx-lm adds the 1 itself
    rope_scaling: tuple[str, ...] = ()  # rope.scaling.type values the model takes
    head_dim: bool = True  # config.json names head_dim (mlx-lm's mixtral and phi3 derive it)
    top: dict[str, str] = field(default_factory=lambda: TOP)


def _llama(meta: Meta, tensors: dict) -> dict:
    """Llama 3.1-3.3 files carry their rope scaling as rope_freqs.weight (gguf_rope.py)."""
    if (factors := tensors.pop("rope_freqs.weight", None)) is None:
        return {}
    from mlxc.model.gguf_rope import llama3_scaling, rotates_as_llama_cpp

    hidden, heads = int(meta.need("embedding_length")), int(meta.need("attention.head_count"))
    dim = int(meta.get("attention.key_length", hidden // heads))  # all of it rotates
    base = float(meta.get("rope.freq_base", 10000.0))
    factors = factors.tolist()  # an mx or numpy array of float32
    scaling = llama3_scaling(factors, base, dim)
    if scaling is None or (scaling and not rotates_as_llama_cpp(scaling, factors, base, dim)):
        meta.refuse("has a rope_freqs.weight tensor that no Llama 3 rope scaling (factor, "
                    "low/high frequency factors, original context) gives, and mlx-lm's rope "
                    "cannot take its per-dimension divisors as they are")
    return {"rope_scaling": scaling} if scaling else {}


def _qwen3moe(meta: Meta, tensors: dict) -> dict:
    layers = int(meta.need("block_count"))
    dense = [i for i in range(layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensors]
    return {
        "num_experts": int(meta.need("expert_count")),
        "num_experts_per_tok": int(meta.need("expert_used_count")),
        "moe_intermediate_size": int(meta.need("expert_feed_forward_length")),
        "decoder_sparse_step": 1,
        "mlp_only_layers": dense,  # layers llama.cpp wrote with a plain ffn
        "norm_topk_prob": True,  # llama.cpp's qwen3moe always renormalises the top k
    }


def _mixtral(meta: Meta, tensors: dict) -> dict:
    heads = int(meta.need("attention.head_count"))
    if int(meta.get("attention.key_length", 0) or 0) not in (0, int(meta.need(
            "embedding_length")) // heads):
        meta.refuse("has a head size other than hidden / heads (mlx-lm's mixtral derives it)")
    return {"num_local_experts": int(meta.need("expert_count")),
            "num_experts_per_tok": int(meta.need("expert_used_count"))}


def _gemma_scalar(meta: Meta, layers_27b: int) -> int:
    # llama.cpp scales queries by 1/sqrt(hidden / heads) for the 27B models and by
    # 1/sqrt(head_dim) for the others (the GGUF has no key for it): do as it does.
    if int(meta.need("block_count")) == layers_27b:
        return int(meta.need("embedding_length")) // int(meta.need("attention.head_count"))
    return int(meta.need("attention.key_length"))


def _gemma2(meta: Meta, tensors: dict) -> dict:
    return {"attn_logit_softcapping": short(meta.get("attn_logit_softcapping", 50.0)),
            "final_logit_softcapping": short(meta.get("final_logit_softcapping", 30.0)),
            "query_pre_attn_scalar": _gemma_scalar(meta, 46)}


def _gemma3(meta: Meta, tensors: dict) -> dict:
    extra = {"query_pre_attn_scalar": _gemma_scalar(meta, 62),
             "sliding_window": int(meta.get("attention.sliding_window", 512)),
             # llama.cpp's gemma3: every 6th layer global, local layers at base 10000.
             "sliding_window_pattern": 6, "rope_local_base_freq": 10000.0}
    if meta.get("rope.scaling.type") == "linear":
        extra["rope_scaling"] = {"rope_type": "linear",
                                 "factor": short(meta.need("rope.scaling.factor"))}
    return extra


def _phi3(meta: Meta, tensors: dict) -> dict:
    hidden, heads = int(meta.need("embedding_length")), int(meta.need("attention.head_count"))
    rotated = int(meta.get("rope.dimension_count", hidden // heads))
    extra = {"partial_rotary_factor": rotated / (hidden // heads)}
    long = tensors.pop("rope_factors_long.weight", None)
    brief = tensors.pop("rope_factors_short.weight", long)
    if long is None and brief is not None:
        meta.refuse("has rope_factors_short.weight without rope_factors_long.weight")
    if long is not None:  # Phi-3.5 / Phi-4-mini 128k: LongRoPE factors stored as tensors
        extra["rope_scaling"] = {"type": "longrope",
                                 "long_factor": [short(v) for v in long.tolist()],
                                 "short_factor": [short(v) for v in brief.tolist()]}
        extra["original_max_position_embeddings"] = int(
            meta.need("rope.scaling.original_context_length"))
    return extra


LLAMA = Architecture("llama", {**ATTENTION, **DENSE}, extra=_llama, rope_traditional=True)
ARCHITECTURES: dict[str, Architecture] = {
    "llama": LLAMA,
    "qwen2": Architecture("qwen2", {**ATTENTION, **DENSE}),
    "qwen3": Architecture("qwen3", {**ATTENTION, **QK_NORM, **DENSE}),
    "qwen3moe": Architecture("qwen3_moe", {**ATTENTION, **QK_NORM, **DENSE, **experts("mlp")},
                             extra=_qwen3moe),
    "gemma": Architecture("gemma", {**ATTENTION, **DENSE}, norm_shift=1.0, top=TIED),
    "gemma2": Architecture("gemma2", {**ATTENTION, **DENSE, **GEMMA_NORMS}, extra=_gemma2,
                           norm_shift=1.0, top=TIED),
    "gemma3": Architecture("gemma3_text", {**ATTENTION, **QK_NORM, **DENSE, **GEMMA_NORMS},
                           extra=_gemma3, norm_shift=1.0, rope_scaling=("linear",)),
    "phi3": Architecture("phi3", {"attn_qkv": "self_attn.qkv_proj",
                                  "attn_output": "self_attn.o_proj",
                                  "attn_norm": "input_layernorm",
                                  "ffn_up": "mlp.gate_up_proj",  # gate and up, in that order
                                  "ffn_down": "mlp.down_proj",
                                  "ffn_norm": "post_attention_layernorm"},
                         extra=_phi3, head_dim=False),
}
MIXTRAL = Architecture("mixtral", {**ATTENTION, "ffn_norm": "post_attention_layernorm",
                                   **experts("block_sparse_moe")},
                       extra=_mixtral, rope_traditional=True, head_dim=False)
# What a refusal names: the GGUF architectures and the families they cover.
SUPPORTED = ("llama, qwen2, qwen3, qwen3moe, gemma, gemma2, gemma3, phi3 (llama covers Mistral "
             "and Mixtral)")


def architecture(meta: dict, file: str) -> tuple[str, Architecture]:
    """(the GGUF's architecture name, its table); refuses an architecture not listed."""
    arch = meta.get("general.architecture")
    arch = arch.item() if hasattr(arch, "item") else arch
    if arch not in ARCHITECTURES:
        raise GGUFConversionError(
            f"{file} is a {arch!r} model; mlxc converts {SUPPORTED} GGUF files. Use an MLX "
            "model folder or a Hugging Face repo id instead")
    if arch == "llama" and int(Meta(meta, arch, file).get("expert_count", 0) or 0) > 0:
        return arch, MIXTRAL
    return arch, ARCHITECTURES[arch]


def build_config(meta: dict, tensors: dict, file: str) -> tuple[Architecture, dict]:
    """config.json for mlx-lm from the metadata (and the tensors' shapes)."""
    arch, table = architecture(meta, file)
    m = Meta(meta, arch, file)
    hidden, heads = int(m.need("embedding_length")), int(m.need("attention.head_count"))
    head_dim = int(m.get("attention.key_length", hidden // heads))
    if arch != "phi3" and int(m.get("rope.dimension_count", head_dim)) != head_dim:
        m.refuse("rotates only part of each head")
    if (scaling := m.get("rope.scaling.type", "none")) not in ("none", *table.rope_scaling):
        m.refuse(f"uses {scaling!r} rope scaling")
    if "token_embd.weight" not in tensors:
        raise GGUFConversionError(f"{file} has no token embedding (token_embd); is it corrupt?")
    config = {
        "model_type": table.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(m.need("block_count")),
        "intermediate_size": int(m.get("feed_forward_length")
                                 or m.need("expert_feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(m.get("attention.head_count_kv", heads)),
        "rms_norm_eps": short(m.need("attention.layer_norm_rms_epsilon")),
        "rope_theta": short(m.get("rope.freq_base", 10000.0)),
        "rope_traditional": table.rope_traditional,
        "max_position_embeddings": int(m.get("context_length", 2048)),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if table.head_dim:
        config["head_dim"] = head_dim
    config.update(table.extra(m, tensors))
    if "rope_freqs.weight" in tensors:  # left by extra: only llama's reads it
        m.refuse("has a rope_freqs.weight tensor, which mlxc reads only for Llama 3, not for "
                 f"mlx-lm's {table.model_type}")
    for key in ("bos", "eos"):
        if (token_id := meta.get(f"tokenizer.ggml.{key}_token_id")) is not None:
            config[f"{key}_token_id"] = int(token_id)
    return table, config

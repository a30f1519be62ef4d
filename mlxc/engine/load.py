"""The engine's model load, on the engine thread: the folder made ready (fetched, converted),
the weights and tokenizer loaded, the dtype applied, and the model readied for the engine's
batch path (CUDA kernels, last-position logits, context length).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from mlxc.config import Settings
from mlxc.errors import ModelError
from mlxc.model.quiet import quiet_libraries
from mlxc.model.refs import ModelRef, model_fingerprint, prepare_model
from mlxc.sidecar import read_json, write_json


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
    draft: Any = None  # the DraftModel of --draft-model (decode/draft_model.py), if any


def load_for_engine(ref: ModelRef, settings: Settings,
                    progress: Callable[[str], None]) -> LoadedModel:
    """Load `ref` as the engine runs it (call on the thread that will drive MLX)."""
    quiet_libraries()
    from mlxc.model.blas import load_optimised_blas

    load_optimised_blas()  # must come before the first `import mlx.core`
    prepare_model(ref, progress)
    progress(f"loading {ref.name}")
    from mlxc.distributed import serving
    from mlxc.model.dtype import apply_dtype, effective_dtype_without_mlx

    dtype = effective_dtype_without_mlx(settings.dtype, ref.folder, settings.cache_dir)
    ready = None
    if serving.ROLE is not None:  # rank 0 of `mlxc serve --distributed`: its shard, leading
        _import_mlx_lm()
        model, tokenizer = serving.load_leader(ref.folder)
    else:  # mlx_lm.load's two steps: the import and the tokenizer (Python) on a thread
        # beside the weights' dequantization (MLX, no GIL), then the model around them.
        imported = threading.Event()
        tokenizer_job = _in_background(_tokenizer_after_import, ref.folder, imported)
        from mlxc.model.early_dequant import dequantize_files

        ready = dequantize_files(ref.folder, dtype)
        imported.wait()
        load_model = _import_mlx_lm()
        model, _config = load_model(ref.folder, lazy=ready is not None)
    apply_dtype(model, dtype, ready)
    del ready
    if serving.ROLE is None:
        tokenizer = tokenizer_job.result()
    from mlxc.engine.cuda import batch_kernels, compiled_decode, fused_projections, quant_rows

    fused_projections.install(model, settings.fused_projections)  # CUDA, before the kernels
    quant_rows.install(model)  # CUDA: quantized projections of 1-16 rows, kept packed
    batch_model = compiled_decode.for_model(model, settings.compiled_decode)
    kernels = batch_kernels.for_model(model, settings.batch_kernels, batch_model is not model)
    args = getattr(model, "args", None)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        dtype=dtype,
        batch_model=batch_model,
        batch_kernels=kernels,
        last_only=_last_position_check(model, ref, settings, serving.ROLE is None),
        context_length=int(getattr(args, "max_position_embeddings", 0) or 0),
        draft=load_draft(ref, tokenizer, settings, progress),
    )


def load_draft(target: ModelRef, tokenizer: Any, settings: Settings,
               progress: Callable[[str], None]) -> Any:
    """The draft model of `--draft-model`, loaded as mlxc loads any model (folder, GGUF, hub
    id; the same dtype rule), or None (none given, or a mode that does not use one: off,
    ngram). Refused with a ModelError when its tokenizer is not the target's."""
    if not settings.draft_model or settings.speculate not in ("auto", "draft"):
        return None
    from mlxc.engine.decode.draft_model import DraftModel, tokenizer_difference
    from mlxc.model.dtype import apply_dtype, effective_dtype_without_mlx
    from mlxc.model.early_dequant import dequantize_files
    from mlxc.model.refs import resolve_model

    ref = resolve_model(settings.draft_model, settings)
    prepare_model(ref, progress)
    _import_mlx_lm()
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache
    from mlx_lm.utils import load_config, load_tokenizer

    draft_tokenizer = load_tokenizer(ref.folder,
                                     eos_token_ids=load_config(ref.folder).get("eos_token_id"))
    if (differs := tokenizer_difference(tokenizer, draft_tokenizer)) is not None:
        raise ModelError(
            f"the draft model {ref.name} cannot draft for {target.name}: their tokenizers "
            f"differ ({differs}). A draft model must have the target's tokenizer (a smaller "
            "model of the same family); pick another with --draft-model, or leave it out "
            "(prompt lookup still speculates).")
    progress(f"loading the draft model {ref.name}")
    dtype = effective_dtype_without_mlx(settings.dtype, ref.folder, settings.cache_dir)
    ready = dequantize_files(ref.folder, dtype)
    model, _config = _import_mlx_lm()(ref.folder, lazy=ready is not None)
    apply_dtype(model, dtype, ready)
    if not can_trim_prompt_cache(make_prompt_cache(model)):
        raise ModelError(
            f"the draft model {ref.name} keeps a cache that cannot be cut back (sliding window "
            "or recurrent layers), so its rejected drafts could not be undone: pick a model "
            "with plain attention layers, or leave --draft-model out.")
    draft = DraftModel(model, ref.name)
    warm_draft(draft, tokenizer)
    return draft


def warm_draft(draft: Any, tokenizer: Any) -> None:
    """One short draft, so that its kernels (CUDA compiles each on first use) are not the
    first drafted token's measured cost, which sizes every draft after it; then forgotten,
    but for one warm prefill's rate per token (what a sequence's first draft must catch up)."""
    from mlxc.engine.decode.draft_model import DraftSequence

    tokens = tokenizer.encode("Warm up: the quick brown fox jumps over the lazy dog.")
    DraftSequence(draft).propose(tokens[:-1], tokens[-1], 4)
    DraftSequence(draft).propose(tokens[:1], tokens[1], 2)  # the catch-up of one token too
    draft.seconds_per_token = draft.seconds_per_prefilled = None
    prompt = (tokens * (128 // len(tokens) + 1))[:128]  # now warm: a prompt's rate per token
    DraftSequence(draft).propose(prompt[:-1], prompt[-1], 1)
    draft.seconds_per_token, draft.prefilled_tokens, draft.prefill_seconds = None, 0, 0.0


def _import_mlx_lm() -> Callable[..., Any]:
    """mlx_lm.utils.load_model, or a ModelError saying how to install MLX."""
    try:
        from mlx_lm.utils import load_model
    except ImportError as exc:
        raise ModelError(
            f"MLX cannot be loaded on this machine ({exc}); cached answers still work, "
            "new ones need `pip install mlx-lm` and mlx (mlx[cpu] on Linux)."
        ) from exc
    return load_model


def _tokenizer_after_import(folder, imported: threading.Event) -> Any:
    """Import mlx-lm (and transformers, ~0.8 s of Python), say so, then load the tokenizer as
    mlx_lm.load does. A failed import is reported by the engine thread's own import."""
    try:
        from mlx_lm.utils import load_config, load_tokenizer
    finally:
        imported.set()
    return load_tokenizer(folder, eos_token_ids=load_config(folder).get("eos_token_id"))


def _in_background(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Future:
    """fn(*args, **kwargs) on a thread of its own (it must not touch MLX), as a Future:
    the tokenizer's ~0.3 s of Python runs while MLX reads and converts the weights."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # handed to the engine thread, which reports it
            future.set_exception(exc)

    threading.Thread(target=run, name="mlxc-tokenizer", daemon=True).start()
    return future


def _last_position_check(model: Any, ref: ModelRef, settings: Settings, keep: bool) -> bool:
    """`supports_last_position_logits`, which runs the model twice (0.15-0.19 s of SmolLM2-135M's
    ~1 s load on the 2-core CPU). Its answer follows from the weights and dtype (the
    fingerprint), MLX and mlx-lm, so with `keep` it is kept beside the memory gate's
    measurements (in measured/last-position/) and read back on the next start."""
    from mlxc.engine.decode.generate import supports_last_position_logits

    fingerprint = model_fingerprint(ref, settings) if keep else None
    if not fingerprint:
        return supports_last_position_logits(model)
    import mlx.core as mx
    import mlx_lm

    key = f"{fingerprint}\0{mx.__version__}\0{mlx_lm.__version__}\0{mx.default_device()}"
    name = f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"
    path = settings.cache_dir / "measured" / "last-position" / name
    kept = read_json(path)
    if isinstance(kept, dict) and isinstance(kept.get("last_only"), bool):
        return kept["last_only"]
    answer = supports_last_position_logits(model)
    write_json(path, {"last_only": answer})
    return answer

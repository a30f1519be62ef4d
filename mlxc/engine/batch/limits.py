"""How much the engine takes at once: sequences in the batch and requests in the queue,
decided without importing MLX (the CLI shows them before a model loads)."""

from __future__ import annotations

from mlxc.config import Settings
from mlxc.model.refs import ModelRef

# Sequences decoded together (`mlxc serve --max-batch`). On CUDA (MLX 0.32.4, H200, 3B 4-bit;
# benchmarks/diagnostics/batch_steps.py) a batch of 4 decodes 276 tokens/s and one of 8 only 159:
# the quantized matmul slows down past 4 rows there, so a model kept quantized on CUDA batches 4.
# Dequantized (model/dtype.py) and elsewhere mlx-lm's batching scales further.
DEFAULT_MAX_BATCH_QUANTIZED_CUDA = 4
DEFAULT_MAX_BATCH_ELSEWHERE = 8
DEFAULT_MAX_QUEUE = 64  # requests waiting for a place in the batch before 503s
RETRY_AFTER_SECONDS = 2


def default_max_batch(ref: ModelRef, settings: Settings) -> int:
    """The measured default for this backend and model (decided without importing MLX)."""
    import sys

    from mlxc.model.dtype import effective_dtype_without_mlx, gpu_backend, scales_dtype

    if not gpu_backend() or sys.platform == "darwin":
        return DEFAULT_MAX_BATCH_ELSEWHERE
    try:
        quantized = scales_dtype(ref.folder) is not None
    except Exception:  # an unreadable folder: the loader says why
        quantized = False
    kept = effective_dtype_without_mlx(settings.dtype, ref.folder, settings.cache_dir) == "keep"
    return DEFAULT_MAX_BATCH_QUANTIZED_CUDA if quantized and kept else (
        DEFAULT_MAX_BATCH_ELSEWHERE)

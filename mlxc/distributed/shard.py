"""A local MLX model folder loaded as this rank's shard, with mlx-lm's own sharding: tensor
parallel (`model.shard`, llama/qwen-family models) or pipeline parallel
(`model.model.pipeline`, models with mlx-lm's PipelineMixin; llama through pipeline.py).
mlx-lm's `sharded_load` does the same for hub repos; it needs a safetensors index to pick
files, which a one-file local folder lacks, so the folder is loaded lazily and only this
rank's weights are evaluated."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

LAYOUTS = ("tensor", "pipeline", "auto")


class ShardingError(ValueError):
    pass


# Cache classes whose operations between model calls every rank repeats (cache_ops.py),
# tested against one process: a model with any other layer (recurrent state, chunked or
# quantized KV) is refused at start rather than answering from caches out of step.
MIRRORED_CACHES = ("KVCache", "RotatingKVCache")


def check_caches(model: Any) -> None:
    """Refuse a model whose cache layers the ranks cannot keep in step."""
    from mlx_lm.models.cache import make_prompt_cache

    other = sorted({type(c).__name__ for c in make_prompt_cache(model)} - set(MIRRORED_CACHES))
    if other:
        raise ShardingError(
            f"this model's cache layers ({', '.join(other)}) are not mirrored across ranks "
            f"yet (only {' and '.join(MIRRORED_CACHES)}): serve it in one process (without "
            "--distributed/--shards)")


def layout_for(model: Any, wanted: str, heads: list[int | None] | None = None,
               ranks: int = 1) -> str:
    """'tensor' or 'pipeline': what `wanted` (tensor|pipeline|auto) means for this model;
    auto is tensor where the model has it and its `heads` (query, KV) split over `ranks`."""
    from mlxc.distributed.pipeline import can_pipeline

    can_tensor = hasattr(model, "shard")
    can_pipe = hasattr(getattr(model, "model", None), "pipeline") or can_pipeline(model)
    if wanted == "auto":  # tensor splits every layer's work; pipeline only the weights
        if can_tensor and (not can_pipe or _divide(heads, ranks)):
            return "tensor"
        if can_pipe:
            return "pipeline"
    elif wanted == "tensor" and can_tensor or wanted == "pipeline" and can_pipe:
        return wanted
    able = [n for n, ok in (("tensor", can_tensor), ("pipeline", can_pipe)) if ok]
    raise ShardingError(
        f"{type(model).__module__.rsplit('.', 1)[-1]} models cannot be split by --parallel "
        f"{wanted}; " + (f"use --parallel {' or '.join(able)}" if able
                         else "mlx-lm has no sharding for this architecture"))


def _divide(heads: list[int | None] | None, ranks: int) -> bool:
    return not any(h and h % ranks for h in heads or ())


def load_shard(folder: Path, group: Any, wanted: str = "auto") -> tuple[Any, Any, str]:
    """(model, tokenizer, layout) of this rank's shard; every rank must call it together."""
    import mlx.core as mx
    from mlx_lm.utils import load_model, load_tokenizer

    from mlxc.distributed.pipeline import can_pipeline, pipeline

    model, config = load_model(folder, lazy=True, strict=False)
    heads = [config.get(k) for k in ("num_attention_heads", "num_key_value_heads")]
    layout = layout_for(model, wanted, heads, group.size())
    check_caches(model)  # every rank refuses alike, before any collective
    if wanted == "auto" and layout == "pipeline" and hasattr(model, "shard") and \
            group.rank() == 0:
        print(f"mlxc: {heads[0]} query / {heads[1]} key-value heads do not split over "
              f"{group.size()} ranks (tensor parallel): pipeline parallel instead, the layers "
              "split", file=sys.stderr, flush=True)
    if group.size() > 1:
        if layout == "tensor":
            if not _divide(heads, group.size()):
                pipe = hasattr(model.model, "pipeline") or can_pipeline(model)
                other = (", or --parallel pipeline" if pipe
                         else " (mlx-lm has no pipeline parallel for this architecture)")
                raise ShardingError(
                    f"tensor parallel splits attention heads evenly: {heads[0]} query and "
                    f"{heads[1]} key/value heads do not split over {group.size()} ranks; "
                    f"use a world size that divides both{other}")
            model.shard(group)
        elif hasattr(model.model, "pipeline"):
            model.model.pipeline(group)
        else:
            pipeline(model, group)
    mx.eval(model.parameters())
    tokenizer = load_tokenizer(folder, eos_token_ids=config.get("eos_token_id"))
    # Every rank loaded: a slow loader must not time out the first collective.
    from mlxc.distributed.mirror import collective_stream

    mx.eval(mx.distributed.all_sum(mx.array(1.0), group=group, stream=collective_stream()))
    return model, tokenizer, layout

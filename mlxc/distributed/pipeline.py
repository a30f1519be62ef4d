"""Pipeline parallel for mlx-lm's llama models, which ship tensor parallel only (`model.shard`):
the default SmolLM2-135M (9 query / 3 KV heads) cannot be split by heads over 2 ranks, but its
30 layers split fine. mlx-lm's own PipelineMixin does the split (rank 0 the last layers, as for
qwen2); the call is qwen2's pipelined one: receive the hidden state from the next rank, run
this rank's layers, send it on, and gather the result on every rank. Full attention only (a
sliding-window layer's mask is not passed along)."""

from __future__ import annotations

from typing import Any


def can_pipeline(model: Any) -> bool:
    """A llama model of full-attention layers (mlx-lm has no pipeline for it)."""
    inner = getattr(model, "model", None)
    return (type(model).__module__ == "mlx_lm.models.llama" and inner is not None
            and not hasattr(inner, "pipeline")
            and all(not getattr(layer, "use_sliding", False) for layer in inner.layers))


def pipeline(model: Any, group: Any) -> None:
    """Split `model`'s layers over `group` in place (before its weights are evaluated)."""
    import mlx.core as mx
    from mlx_lm.models.base import create_attention_mask
    from mlx_lm.models.pipeline import PipelineMixin

    inner, outer = model.model, type(model)
    base = type(inner)

    class Pipelined(PipelineMixin, base):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
            rank, size = self.pipeline_rank, self.pipeline_size
            layers = self.pipeline_layers
            if cache is None:
                cache = [None] * len(layers)
            mask = create_attention_mask(h, cache[0])
            if rank < size - 1:  # the layers before ours run on the next rank
                h = mx.distributed.recv_like(h, rank + 1, group=group)
            for layer, c in zip(layers, cache, strict=True):
                h = layer(h, mask, cache=c)
            if rank != 0:
                h = mx.distributed.send(h, (rank - 1) % size, group=group)
                if cache[-1] is not None:  # the send runs before the cache is read again
                    cache[-1].keys = mx.depends(cache[-1].keys, h)
            if size > 1:  # every rank gets the last layers' output, still in the graph
                h = mx.distributed.all_gather(h, group=group)[: h.shape[0]]
            return self.norm(h)

    class Outer(outer):
        @property
        def layers(self):  # this rank's layers: its cache has one entry for each
            return self.model.pipeline_layers

    for cls, name in ((Pipelined, base.__name__), (Outer, outer.__name__)):
        cls.__name__ = cls.__qualname__ = name
    inner.__class__, model.__class__ = Pipelined, Outer
    inner.pipeline_rank, inner.pipeline_size, inner.start_idx, inner.end_idx = 0, 1, 0, None
    inner.pipeline(group)

"""mlxc's CUDA kernels for batched decode steps (cuda/small_rows.py: projections of a few rows;
cuda/batch_attention.py: attention over a left-padded batch), switched on around each batched
step only. A lone sequence's step and every prefill run mlx-lm's code untouched, without
even the routing's per-call checks (on the H200 a lone step is ~4 ms, set by the host, and
~200 checks would cost it ~5%)."""

from __future__ import annotations

import contextlib
import sys
from typing import Any

from mlxc.engine.cuda import batch_attention, small_rows


class BatchKernels:
    """A context: inside it the model's plain linear layers and its module's attention
    helper take the kernels' paths where a call fits them. Engine thread only."""

    def __init__(self, model: Any, max_rows: int = small_rows.MAX_ROWS) -> None:
        import mlx.nn as nn

        self._linears = [m for _, m in model.named_modules()
                         if max_rows > 1 and small_rows.takes(m)]
        self._plain = nn.Linear  # `takes` plain ones only
        self._routed = small_rows.routed_linear(max_rows)
        self._module = sys.modules.get(type(model).__module__)
        self._attention = getattr(self._module, "scaled_dot_product_attention", None)
        self._routed_attention = self._attention and batch_attention.routed(self._attention)

    def __enter__(self) -> BatchKernels:
        for linear in self._linears:
            linear.__class__ = self._routed
        if self._routed_attention:
            self._module.scaled_dot_product_attention = self._routed_attention
        return self

    def __exit__(self, *_: Any) -> None:
        for linear in self._linears:
            linear.__class__ = self._plain
        if self._attention:
            self._module.scaled_dot_product_attention = self._attention


def for_model(model: Any, enabled: bool, compiled: bool = False
              ) -> contextlib.AbstractContextManager:
    """The kernels' switch for `model` on CUDA (when `enabled`; `compiled`: the batched step
    runs compiled, where the projection kernel takes fewer rows, see cuda/small_rows.py);
    elsewhere a switch that does nothing."""
    if enabled and small_rows.usable():
        return BatchKernels(
            model, small_rows.COMPILED_MAX_ROWS if compiled else small_rows.MAX_ROWS)
    return contextlib.nullcontext()

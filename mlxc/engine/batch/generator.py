"""mlx-lm's `BatchGenerator`, less one copy of the KV caches in the common case.

When sequences' prompts are done, mlx-lm splits them off its prompt batch to decode: it
deep-copies the whole batch's caches, then filters both copies, which reads each layer's
padding back to the host. When every sequence in the prompt batch leaves at once (a burst
prefilled together, or sequences joining with their prompts already in), nothing stays
behind to copy for: the split hands the batch over as it is. On the H200 that copy took
15-17 ms of a burst's first token (`benchmarks/diagnostics/burst_timeline.py --sync`, 3B, 4-8 rows).
"""

from __future__ import annotations

import copy
from typing import Any

from mlx_lm.generate import BatchGenerator, PromptProcessingBatch


class _PromptBatch(PromptProcessingBatch):
    def split(self, indices: list[int]) -> PromptProcessingBatch:
        if sorted(set(indices)) != list(range(len(self.uids))):
            return super().split(indices)
        whole = copy.copy(self)  # takes the caches and lists; this batch starts empty
        self.prompt_cache = []
        self.filter([])
        return whole


class Batch(BatchGenerator):
    """`BatchGenerator` whose prompt batch splits without a copy when all of it leaves."""

    def __init__(self, model: Any, **kwargs: Any) -> None:
        super().__init__(model, **kwargs)
        self._prompt_batch.__class__ = _PromptBatch

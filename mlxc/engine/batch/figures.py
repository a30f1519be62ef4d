"""What /health and /metrics show of the batch: plain numbers, written on the engine thread
and read from any."""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

RATE_WINDOW = 10.0  # seconds of decode the tokens/s figure looks back on


@dataclass
class Figures:
    """Decode steps by batch size, tokens made, and their recent rate."""

    batch_sizes: Counter = field(default_factory=Counter)  # decode steps by batch size
    generated_tokens: int = 0
    back_alone: int = 0  # sequences the batch handed back to the lone loop (its last one)
    drafted: int = 0  # speculative decoding: draft tokens verified, of finished sequences
    accepted: int = 0  # and of them, taken into answers
    sources: dict = field(default_factory=dict)  # by draft source: "ngram" -> (drafted, taken)
    step_costs: Any = None  # the lone gate's StepCosts (its describe() is plain numbers)
    recent: deque = field(default_factory=lambda: deque(maxlen=256))  # (time, tokens)

    def add_speculation(self, f: Any) -> None:
        """A finished sequence's SpeculationFigures (decode/speculate.py)."""
        self.drafted += f.drafted
        self.accepted += f.accepted
        for source, (drafted, accepted) in f.by_source.items():
            counts = self.sources.get(source, (0, 0))
            self.sources[source] = (counts[0] + drafted, counts[1] + accepted)  # one store

    def tokens_per_second(self) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in list(self.recent) if now - t <= RATE_WINDOW]
        if len(recent) < 2:
            return 0.0
        span = recent[-1][0] - recent[0][0]
        return sum(n for _, n in recent[1:]) / span if span > 0 else 0.0

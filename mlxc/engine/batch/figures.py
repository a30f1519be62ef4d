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


def engine_figures(engine: Any) -> dict[str, Any]:
    """An Engine's batch figures for /health and /metrics (plain numbers, any thread)."""
    scheduler = engine.scheduler
    figures = scheduler.figures if scheduler else None
    return {
        "running": engine.running,
        "waiting": engine.waiting,
        "max_batch": engine.max_batch,
        "max_queue": engine.max_queue,
        "batch_sizes": dict(figures.batch_sizes) if figures else {},
        "generated_tokens": figures.generated_tokens if figures else 0,
        "back_alone": figures.back_alone if figures else 0,
        "speculation": _speculation(figures, getattr(engine, "draft", None)),
        "tokens_per_second": round(figures.tokens_per_second(), 2) if figures else 0.0,
        **(engine.memory.figures() if engine.memory is not None else {}),
        **getattr(getattr(engine, "batch_model", None), "figures", dict)(),  # CUDA: compiled
    }


def _speculation(figures: Any, draft: Any) -> dict[str, Any]:
    """Draft tokens verified and accepted (decode/speculate.py), and the acceptance rate; the
    same by draft source (ngram, prediction, draft); the draft model, if any."""
    drafted, accepted = (figures.drafted, figures.accepted) if figures else (0, 0)
    sources = dict(figures.sources) if figures else {}
    return {"drafted": drafted, "accepted": accepted,
            "acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
            "sources": {name: {"drafted": d, "accepted": a} for name, (d, a) in sources.items()},
            "step_costs": figures.step_costs.describe() if figures else None,
            "draft_model": draft.figures() if draft is not None else None}

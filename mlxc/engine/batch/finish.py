"""A sequence's end, wherever it decoded (alone, in the batch, or cut short while prefilling):
its state goes to the prefix cache, its answer is published, and a conversation likely to go
on is kept for the idle next-turn prefill. Engine thread only."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from mlxc.engine.batch.figures import Figures
from mlxc.engine.batch.sequence import Sequence
from mlxc.request import GenerationRequest
from mlxc.stream import Failed, Finished

log = logging.getLogger("mlxc.engine")
KEPT_TURNS = 4  # the most recent few conversations


@dataclass
class NextTurn:
    """A finished conversation's state, kept to prefill its next turn's opening when idle."""

    request: GenerationRequest
    kept: list[int]  # the key its state was stored under
    said: list[int]  # prompt + answer tokens
    text: str
    cache: list[Any]


def finish(engine: Any, figures: Figures, next_turns: list[NextTurn], seq: Sequence,
           cache: list[Any] | None, held: list[int] | None) -> None:
    """Store the sequence's state (kept even when cancelled: its prompt is still good for the
    next request), then publish its answer."""
    kept = None
    if seq.drafter is not None:
        figures.add_speculation(seq.drafter.figures)
    if cache and held:
        try:
            kept = engine.prompt_cache.store(list(held), cache)
        except Exception as exc:  # an optimisation: never worth an answer
            log.warning("prefix cache: cannot store a state (%s)", exc)
    try:
        answer = seq.answer(engine.ref.name)
    except Exception as exc:
        seq.generation.publish(Failed(exc))
        return
    wanted = engine.settings.next_turn_prefill and seq.finish != "cancelled"
    if kept and wanted and not seq.stops.tool_calls:  # a user's turn comes next, most likely
        next_turns.append(NextTurn(seq.request, kept, seq.said, answer.text, cache))
        del next_turns[:-KEPT_TURNS]
    seq.generation.publish(Finished(answer))

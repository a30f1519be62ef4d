"""How one sequence picks its tokens: its sampler, its logits processors (penalties; grammar
constraints) and what it records of each step (log-probabilities, when asked).

One `SequenceSampling` per sequence, built on the engine thread when the sequence starts, so
that sequences in one batch each keep their own settings. The engine calls `observe` with
each token it sampled that belongs to the answer (not an end token) and that step's
log-probabilities, hands `take_logprobs()` out with each piece of text it publishes
(`Delta.logprobs`), and puts `logprobs` (all of them) into the final `Answer.logprobs`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlxc.engine.decode.constraints import grammar_for
from mlxc.engine.decode.logprobs import LogprobRecorder
from mlxc.request import GenerationRequest


@dataclass
class SequenceSampling:
    sampler: Callable[[Any], Any]
    processors: list[Callable[[Any, Any], Any]] = field(default_factory=list)
    recorder: LogprobRecorder | None = None

    def observe(self, token: int, logprobs: Any) -> None:
        """One step's sampled token and its log-probability row (an mx.array over the
        vocabulary, after processors). Engine thread."""
        if self.recorder is not None:
            self.recorder.observe(token, logprobs)

    def take_logprobs(self) -> list[dict] | None:
        """Log-probability entries recorded since the last call, or None if not asked."""
        return None if self.recorder is None else self.recorder.take()

    @property
    def logprobs(self) -> list[dict] | None:
        """Every entry recorded so far (for the final Answer), or None if not asked."""
        return None if self.recorder is None else list(self.recorder.entries)


def build_sampling(request: GenerationRequest, tokenizer: Any) -> SequenceSampling:
    """The sampler and processors a request asks for (mlx-lm's own samplers and penalties)."""
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    if request.seed is not None and request.temperature > 0:  # its own key: holds in a batch
        from mlxc.engine.decode.seeds import keyed_sampler

        sampler = keyed_sampler(
            request.seed, request.temperature, request.top_p, request.min_p, request.top_k
        )
    else:
        sampler = make_sampler(
            request.temperature, request.top_p, request.min_p, top_k=request.top_k
        )
    processors = make_logits_processors(
        repetition_penalty=(
            None if request.repetition_penalty == 1 else request.repetition_penalty
        ),
        presence_penalty=request.presence_penalty or None,
        frequency_penalty=request.frequency_penalty or None,
    )
    grammar = grammar_for(request.response_format, request.tools, request.tool_choice)
    if grammar is not None:  # last: penalties must not lift a token the grammar forbids
        from mlxc.engine.decode.grammar_mask import GrammarProcessor

        grammar_processor = GrammarProcessor(grammar, tokenizer)
        processors.append(grammar_processor)
        sampler = grammar_processor.watch(sampler)
    recorder = LogprobRecorder(tokenizer, request.top_logprobs) if request.logprobs else None
    return SequenceSampling(sampler, processors, recorder)

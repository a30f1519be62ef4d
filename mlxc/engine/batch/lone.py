"""The decode loop of a sequence that runs alone: mlx-lm's `generate_step`, one step per
scheduler tick, at raw mlx-lm speed.

Measured on an H200 (benchmarks/diagnostics/batch_steps.py, 3B-shape 4-bit model): mlx-lm's
`BatchGenerator` decodes one sequence at 0.64x `stream_generate` (its batch cache builds a mask
every step and the attention takes the masked path), so a sequence that is alone decodes here on
its own cache. When a second sequence is ready to decode, the lone one moves into the batch
(`handover`) with its cache and the token it has not fed yet; the batch's last sequence comes
back here (`resume`). With `--max-batch 1` every sequence stays here, which gives exactly
mlx-lm's greedy answers.

Pipelined as mlx-lm does on both backends: the step that feeds token n is queued before token n
is read, so the GPU computes while Python publishes. The first token (sampled by the prefill) is
published before the second one's step is queued: on the CPU, queuing a step runs most of it.

A sequence may speculate (decode/speculate.py): a step with a draft reads the pending token,
verifies it and the draft in one pass and takes the agreeing run (greedy) or the run rejection
sampling accepts (sampled, decode/rejection.py); a step without one is the plain pipelined
step. Only here does a draft model draft (decode/draft_model.py): its cache follows the
sequence, so a sequence that comes back from the batch catches it up in one pass.
"""

from __future__ import annotations

import time
from typing import Any

from mlxc.engine.batch.sequence import Sequence


class LoneDecoder:
    def __init__(self, model: Any, seq: Sequence, first: Any, costs: Any,
                 draft: Any = None) -> None:
        """`seq` has taken its first token (`first`, an evaluated mx.array of shape (1,)),
        which its cache does not hold yet. `costs`: the scheduler's StepCosts, which this
        loop's plain steps and verify passes feed (decode/speculate.py); `draft`: the
        engine's DraftModel, if any."""
        import mlx.core as mx

        self.model, self.seq = model, seq
        self.cache = seq.cache
        self.context = mx.array(seq.prompt) if seq.sampling.processors else None
        self.pending, self.pending_row = self._queue(first)  # not yet read nor fed
        self.steps = 0
        self.costs = costs
        self.drafter = _drafter(seq, costs, draft)
        self.weights = _weights(seq)
        self._pipelined = False  # the pending token's step was queued behind a plain one

    @classmethod
    def resume(cls, model: Any, seq: Sequence, pending: Any, row: Any,
               costs: Any, draft: Any = None) -> LoneDecoder:
        """Continue a sequence that leaves the batch: its cache holds its prompt and every
        token it took, and `pending` (shape (1,)), the token after them, is being computed
        with its log-probabilities `row`."""
        import mlx.core as mx

        self = cls.__new__(cls)
        self.model, self.seq, self.cache = model, seq, seq.cache
        self.context = mx.array(self.held) if seq.sampling.processors else None
        self.pending, self.pending_row = pending, row
        self.steps = 0
        self.costs = costs
        self.drafter = _drafter(seq, costs, draft)
        self.weights = _weights(seq)
        self._pipelined = False
        return self

    def _queue(self, token: Any) -> tuple[Any, Any]:
        """Queue the pass that feeds `token` and samples the one after it."""
        import mlx.core as mx

        logits = self.model(token[None], cache=self.cache)[:, -1, :]
        if self.seq.sampling.processors:
            self.context = mx.concatenate([self.context, token])
            for processor in self.seq.sampling.processors:
                logits = processor(self.context, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        token = self.seq.sampling.sampler(logprobs)
        mx.async_eval(token, logprobs)
        return token, logprobs[0]

    @property
    def held(self) -> list[int]:
        """The tokens the cache holds (or will, once the queued step runs)."""
        return self.seq.prompt + self.seq.taken

    def step(self) -> bool:
        """Queue the next step, then read and publish the pending token; True when done."""
        import mlx.core as mx

        token, row = self.pending, self.pending_row
        started = time.perf_counter()
        self.steps += 1
        if self.steps % 256 == 0:
            mx.clear_cache()
        if self.drafter is not None and self.drafter.pause == 0:
            self.drafter.catch_up(self.held)
            draft = self.drafter.propose(token.item(), self.seq.remaining - 1, alone=True)
            if draft:
                return self._speculate(token, row, draft)
            # None found: the plain step; the drafter looks again next time
        elif self.drafter is not None:
            self.drafter.rested(self.seq.tail())
        self.pending, self.pending_row = self._queue(token)
        done = self.seq.take(token.item(), row)
        if self._pipelined:  # one step's time, in steady state
            self.costs.saw_plain(time.perf_counter() - started)
        self._pipelined = True
        return done

    def _speculate(self, token: Any, row: Any, draft: list[int]) -> bool:
        """Feed the pending `token` and `draft` in one pass, take `token` and the drafts
        accepted, and cut the cache back to what was taken."""
        import mlx.core as mx
        from mlx_lm.models.cache import trim_prompt_cache

        from mlxc.engine.decode.speculate import accepted_run, verified_logprobs, verify

        self._pipelined = False
        started = time.perf_counter()
        processors = self.seq.sampling.processors
        if self.weights is None:  # greedy
            best, rows = verify(self.model, self.cache, token, draft, processors, self.context)
            accepted = accepted_run(draft, best)
            after = best[accepted]
        else:
            from mlxc.engine.decode.rejection import sample_run

            rows = verified_logprobs(self.model, self.cache, token, draft, processors,
                                     self.context)
            mx.eval(rows)
            accepted, after = sample_run(rows, draft, self.weights)
        self.costs.saw_verify(len(draft), time.perf_counter() - started)
        self.drafter.verified(len(draft), accepted)
        if processors:  # the tokens the cache keeps: the penalties' context
            fed = mx.array([token.item(), *draft[:accepted]], dtype=self.context.dtype)
            self.context = mx.concatenate([self.context, fed])
        run = [(token.item(), row)] + [(draft[i], rows[i]) for i in range(accepted)]
        for taken, (t, t_row) in enumerate(run, 1):
            if self.seq.take(t, t_row):  # done inside the run: the cache holds what was taken
                trim_prompt_cache(self.cache, len(draft) + 1 - taken)
                return True
        trim_prompt_cache(self.cache, len(draft) - accepted)
        self.pending, self.pending_row = mx.array([after]), rows[accepted]
        return False

    def handover(self) -> tuple[int, bool]:
        """Read and publish the pending token for a move into the batch: (token, done). The
        batch feeds the token itself; the cache holds every token before it."""
        token = self.pending.item()
        return token, self.seq.take(token, self.pending_row)


def _drafter(seq: Sequence, costs: Any, draft: Any) -> Any:
    """The sequence's drafter, kept on it across moves in and out of the batch (one made
    there gets its draft model's state here); None when it does not speculate."""
    if seq.drafter is None and seq.speculate != "off":
        from mlxc.engine.decode.speculate import can_speculate, drafter_for

        if can_speculate(seq, seq.speculate, seq.cache):
            seq.drafter = drafter_for(seq, seq.speculate, costs, draft)
        else:
            seq.speculate = "off"  # decided once
    elif seq.drafter is not None:
        from mlxc.engine.decode.speculate import attach_draft

        attach_draft(seq.drafter, seq.speculate, draft)
    return seq.drafter


def _weights(seq: Sequence) -> Any:
    """What a speculating sampled sequence draws from (decode/rejection.py); None when greedy
    or not speculating."""
    request = seq.request
    if seq.drafter is None or request.temperature == 0:
        return None
    from mlxc.engine.decode.rejection import sampling_weights

    return sampling_weights(request.temperature, request.top_p, request.min_p, request.top_k)

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
"""

from __future__ import annotations

from typing import Any

from mlxc.engine.batch.sequence import Sequence


class LoneDecoder:
    def __init__(self, model: Any, seq: Sequence, first: Any) -> None:
        """`seq` has taken its first token (`first`, an evaluated mx.array of shape (1,)),
        which its cache does not hold yet."""
        import mlx.core as mx

        self.model, self.seq = model, seq
        self.cache = seq.cache
        self.context = mx.array(seq.prompt) if seq.sampling.processors else None
        self.pending, self.pending_row = self._queue(first)  # not yet read nor fed
        self.steps = 0

    @classmethod
    def resume(cls, model: Any, seq: Sequence, pending: Any, row: Any) -> LoneDecoder:
        """Continue a sequence that leaves the batch: its cache holds its prompt and every
        token it took, and `pending` (shape (1,)), the token after them, is being computed
        with its log-probabilities `row`."""
        import mlx.core as mx

        self = cls.__new__(cls)
        self.model, self.seq, self.cache = model, seq, seq.cache
        self.context = mx.array(self.held) if seq.sampling.processors else None
        self.pending, self.pending_row = pending, row
        self.steps = 0
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
        self.pending, self.pending_row = self._queue(token)
        self.steps += 1
        if self.steps % 256 == 0:
            mx.clear_cache()
        return self.seq.take(token.item(), row)

    def handover(self) -> tuple[int, bool]:
        """Read and publish the pending token for a move into the batch: (token, done). The
        batch feeds the token itself; the cache holds every token before it."""
        token = self.pending.item()
        return token, self.seq.take(token, self.pending_row)

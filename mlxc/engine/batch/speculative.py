"""Speculation inside the continuous batch: rows that draft and rows that don't share one step.

A speculative step reads every row's pending token (sampled, not fed yet), lets each
speculating row draft after it (decode/speculate.py), and feeds all rows at once as a
(rows, K+1) block: the pending token, the row's draft, and padding up to the longest draft
(a row without a draft has length 0). Each row then takes its own run: greedy, the drafts
its argmax agrees with; sampled, the run rejection sampling accepts (decode/rejection.py); a
row without a draft, its own sampler's token after the pending one (grammars, seeds and
penalties as in the plain step: one processor call and one draw per token).

mlx-lm's `BatchKVCache` has one write index for all rows (each row is left-padded up to it),
so a row cannot be trimmed on its own. The rejected positions all sit at the right end: the
rejections every row shares are trimmed (`trim`), and each row's further rejected tail is
rolled round to its left and made padding the mask hides, with mlx-lm's own right-padding
step (`prepare(right_padding=...)` + `finalize()`, as its prompt batches use). Each row then
holds exactly the tokens it took, at the positions (RoPE offsets) a plain decode gives them,
so what `extract` hands the prefix cache is a plain decode's state.

Whether a step speculates is decided for the whole batch: every row pays for the block's K+1
positions. With each row's acceptance a_i the step yields sum_i (1 - a_i^(k_i+1)) / (1 - a_i)
tokens (1 for a row without a draft) for verify(K) / plain step, both measured per batch size
on this model and machine (`StepCosts`); the longest draft K that yields most per unit of
time is kept, and none that beats the plain step by GAIN_NEEDED leaves the plain step, which
then is not asked again for a while (until a row joins or leaves). A step without drafts is
the plain, pipelined step. Engine thread only.
"""

from __future__ import annotations

import time
from typing import Any

from mlxc.engine.batch.sequence import Sequence
from mlxc.engine.decode.speculate import (
    FIRST_PAUSE,
    GAIN_NEEDED,
    LONGEST_PAUSE,
    PLAIN_PROBE,
    StepCosts,
    accepted_run,
    expected_tokens,
)

NOTHING_FOUND_PAUSE = 2  # plain steps before looking again when no row found a draft


class BatchSpeculation:
    def __init__(self, model: Any, lone_costs: StepCosts) -> None:
        self.model = model  # the plain model: a verify pass is several positions a row
        self.lone_costs = lone_costs  # what each row's drafter sizes its draft by
        self.costs: dict[int, StepCosts] = {}  # this batch size's plain step and verify pass
        self.pause = 0  # steps left without asking for drafts
        self._next_pause = FIRST_PAUSE
        self._plain_size = 0  # batch size of the last plain step, if it ran in steady state
        self._plain_started = 0.0  # and when it started
        self.steps = self.drafted = self.accepted = 0  # speculative steps, their drafts
        self._members: list[int] = []  # the rows the pause was decided for

    # -- the plain step, timed ---------------------------------------------------------

    def plain(self, batch: Any, steady: bool = True) -> tuple[list[Any], list[Any]]:
        """`batch.next()`. A plain step's cost is the time from one call's start to the next
        one's (pipelined: most of a step's compute overlaps the publishing between calls),
        kept when both were steady decode steps of one batch size: no prompt work in the
        batch, and `steady` (the scheduler ran nothing else between them)."""
        size = len(batch._generation_batch)
        quiet = steady and not (len(batch._prompt_batch) or batch._unprocessed_sequences)
        now = time.perf_counter()
        if quiet and size and self._plain_size == size:
            self._costs(size).saw_plain(now - self._plain_started)
        progress, responses = batch.next()
        self._plain_size, self._plain_started = (size if quiet and not progress else 0), now
        return progress, responses

    def _costs(self, size: int) -> StepCosts:
        return self.costs.setdefault(size, StepCosts())

    # -- the speculative step --------------------------------------------------------

    def step(self, batch: Any, running: dict[int, Sequence]) -> tuple[list[int], int] | None:
        """One speculative step of the whole batch: (uids of the rows it finished, tokens
        taken), or None when no draft is worth a pass (the caller runs the plain step)."""
        gen = _generation_batch(batch, running)
        if gen is None:
            return None
        if gen.uids != self._members:  # others to draft for: the gate looks again at once
            self._members, self.pause, self._next_pause = list(gen.uids), 0, FIRST_PAUSE
        seqs = [running[uid] for uid in gen.uids]
        drafters = [_drafter(seq, self.lone_costs, gen.prompt_cache) for seq in seqs]
        asking = [d is not None and d.pause == 0 for d in drafters]
        for seq, d in zip(seqs, drafters, strict=True):
            if d is not None and d.pause > 0:
                d.rested(seq.tail())  # as the lone loop counts its plain steps
        if self.pause > 0:
            self.pause -= 1
            return None
        if not any(asking):
            return None
        if self._costs(len(seqs)).unmeasured_plain:  # as the lone drafter: time plain steps
            self.pause = PLAIN_PROBE
            return None
        pending = gen._next_tokens.tolist()  # waits for the step in flight
        drafts = []
        for seq, d, ask, token in zip(seqs, drafters, asking, pending, strict=True):
            if ask:
                d.catch_up(seq.prompt + seq.taken)
                drafts.append(d.propose(token, seq.remaining - 1))
            else:
                drafts.append([])
        longest = self._longest_paying(drafters, drafts)
        if longest == 0:
            if any(drafts):
                self._rest()
            else:  # none found: reading the pending tokens each step costs the pipelining
                self.pause = NOTHING_FOUND_PAUSE
            return None
        self._next_pause = FIRST_PAUSE
        drafts = [draft[:longest] for draft in drafts]
        started = time.perf_counter()
        done, taken = self._verify(gen, seqs, drafters, pending, drafts, longest)
        self._plain_size = 0  # the next plain step is not pipelined behind one
        self.steps += 1
        self._costs(len(seqs)).saw_verify(longest, time.perf_counter() - started)
        return done, taken

    def _longest_paying(self, drafters: list[Any], drafts: list[list[int]]) -> int:
        """The draft length K (drafts cut to it) that yields most tokens per unit of time over
        the plain step of this batch; 0 when none gains GAIN_NEEDED."""
        rows, costs = len(drafts), self._costs(len(drafts))
        best, best_gain = 0, GAIN_NEEDED
        for k in range(1, max(map(len, drafts), default=0) + 1):
            yields = sum(
                expected_tokens(d.acceptance, min(len(draft), k)) if draft else 1.0
                for d, draft in zip(drafters, drafts, strict=True)
            )
            gain = yields / rows / costs.ratio(k)
            if gain > best_gain:
                best, best_gain = k, gain
        return best

    def _rest(self) -> None:
        self.pause = self._next_pause
        self._next_pause = min(self._next_pause * 2, LONGEST_PAUSE)

    def _verify(self, gen: Any, seqs: list[Sequence], drafters: list[Any], pending: list[int],
                drafts: list[list[int]], longest: int) -> tuple[list[int], int]:
        import mlx.core as mx

        width = longest + 1
        block = [[token, *draft] + [0] * (longest - len(draft))
                 for token, draft in zip(pending, drafts, strict=True)]
        inputs = mx.array(block, dtype=gen._next_tokens.dtype)
        logits = self.model(inputs, cache=gen.prompt_cache)  # (rows, width, vocab)
        rows = [self._row_logprobs(gen, e, logits[e], inputs[e], len(draft))
                for e, draft in enumerate(drafts)]
        choices = [self._choose(gen, e, seq, rows[e], draft)
                   for e, (seq, draft) in enumerate(zip(seqs, drafts, strict=True))]
        mx.eval(rows, [c for c in choices if not isinstance(c, tuple)])
        done, kept, nexts, next_rows, total = [], [], [], [], 0
        for e, (seq, d, draft) in enumerate(zip(seqs, drafters, drafts, strict=True)):
            accepted, after = _decided(choices[e], draft)
            if draft:
                d.verified(len(draft), accepted)
                self.drafted, self.accepted = self.drafted + len(draft), self.accepted + accepted
            run = [(pending[e], gen._next_logprobs[e])]
            run += [(draft[j], rows[e][j]) for j in range(accepted)]
            taken = self._take(gen, e, seq, run, rebuild=bool(draft))
            total += taken
            kept.append(taken)
            if seq.finish is not None:
                done.append(gen.uids[e])
            nexts.append(after)
            next_rows.append(rows[e][min(accepted, len(draft))])
        _keep_per_row(gen.prompt_cache, [width - n for n in kept])
        gen._next_tokens = mx.array(nexts, dtype=gen._next_tokens.dtype)
        gen._next_logprobs = next_rows
        return done, total

    def _row_logprobs(self, gen: Any, e: int, logits: Any, fed: Any, k: int) -> Any:
        """Row e's log-probabilities after each of its k+1 real positions, processed as the
        plain step processes each (penalties with the context it would have; a row without a
        draft: one call at its one position, so a grammar advances once)."""
        import mlx.core as mx

        processors = gen.logits_processors[e] if gen.logits_processors else None
        logits = logits[: k + 1]
        if processors:
            context = gen._token_context[e].update_and_fetch(fed[: k + 1])
            base = context.size - (k + 1)
            out = []
            for j in range(k + 1):
                row = logits[j : j + 1]
                for processor in processors:
                    row = processor(context[: base + j + 1], row)
                out.append(row)
            logits = mx.concatenate(out)
        return logits - mx.logsumexp(logits, axis=-1, keepdims=True)

    def _choose(self, gen: Any, e: int, seq: Sequence, rows: Any, draft: list[int]) -> Any:
        """Greedy: the argmax after each position (lazy); sampled with a draft: (accepted,
        token) by rejection sampling; no draft: the row's own sampler's token (lazy)."""
        if not draft:
            sampler = (gen.samplers[e] if gen.samplers else None) or gen.fallback_sampler
            return sampler(rows[0:1])
        import mlx.core as mx

        if seq.request.temperature == 0:
            return mx.argmax(rows, axis=-1)
        from mlxc.engine.decode.rejection import sample_run, sampling_weights

        r = seq.request
        mx.eval(rows)
        return sample_run(rows, draft, sampling_weights(r.temperature, r.top_p, r.min_p, r.top_k))

    def _take(self, gen: Any, e: int, seq: Sequence, run: list[tuple[int, Any]],
              rebuild: bool) -> int:
        """Publish row e's run token by token, as the plain steps would have (the batch's own
        counters and end-token matcher kept in step); how many it took before it was done.
        `rebuild`: its penalties' context saw a draft, cut back to what was taken."""
        from mlx_lm.models.cache import TokenBuffer

        taken = 0
        for token, row in run:
            taken += 1
            gen._num_tokens[e] += 1
            reason = "length" if gen._num_tokens[e] >= gen.max_tokens[e] else None
            if gen._matchers[e].advance(token):
                reason = "stop"
            gen.tokens[e].append(token)  # the tokens its cache holds
            if seq.take(token, row, reason) or reason is not None:
                seq.finish = seq.finish or reason
                break
        if rebuild and gen.logits_processors and gen.logits_processors[e]:
            gen._token_context[e] = TokenBuffer(gen.tokens[e])  # without the rejected tail
        return taken


def _decided(choice: Any, draft: list[int]) -> tuple[int, int]:
    """(drafts accepted, the token after them) of a row's choice."""
    if isinstance(choice, tuple):  # sampled: rejection sampling decided
        return choice
    best = choice.tolist()
    if not draft:
        return 0, best[0]
    accepted = accepted_run(draft, best)
    return accepted, best[accepted]


def _keep_per_row(caches: list[Any], rejected: list[int]) -> None:
    """Drop each row's `rejected` last positions: the ones all rows share by trimming, the
    rest of each by rolling them round into that row's left padding (mlx-lm's own step)."""
    common = min(rejected)
    shifts = [n - common for n in rejected]
    for cache in caches:
        if common:
            cache.trim(common)
        if any(shifts):
            cache.prepare(right_padding=shifts)
            cache.finalize()


def _generation_batch(batch: Any, running: dict[int, Sequence]) -> Any:
    """mlx-lm's generation batch when a speculative step can run on it: no prompt work in
    the batch, every row's cache a plain `BatchKVCache` (whose rows can be cut this way),
    every row a running sequence. None otherwise (another mlx-lm, a sliding window...)."""
    from mlx_lm.models.cache import BatchKVCache

    try:
        gen = batch._generation_batch
        if len(batch._prompt_batch) or batch._unprocessed_sequences or not len(gen):
            return None
        if gen._next_tokens is None or not gen.prompt_cache:
            return None
        if any(type(c) is not BatchKVCache for c in gen.prompt_cache):
            return None
        if any(uid not in running for uid in gen.uids):
            return None
    except AttributeError:
        return None
    return gen


def _drafter(seq: Sequence, costs: StepCosts, cache: list[Any]) -> Any:
    """The sequence's drafter (kept on it across moves in and out of the batch, as the lone
    loop's); None when it does not speculate."""
    if seq.drafter is None and seq.speculate != "off":
        from mlxc.engine.decode.speculate import can_speculate, drafter_for

        if can_speculate(seq, seq.speculate, cache):
            seq.drafter = drafter_for(seq, seq.speculate, costs)
        else:
            seq.speculate = "off"  # decided once
    return seq.drafter

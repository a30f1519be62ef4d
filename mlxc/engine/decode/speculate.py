"""Speculative decoding of one sequence: drafts from prompt lookup (n-grams of the
sequence's own prompt and answer), from a client's Predicted Output and from a draft model
(decode/draft_model.py, a sequence decoding alone only), verified in one pass. The cheap
sources go first: a prediction, then prompt lookup, then the draft model when neither found a
draft (they cost nothing to make; each source has its own acceptance count).

A step with a draft feeds the token not yet fed and the k drafted tokens after it in one pass
of k+1 positions, takes a run of drafted tokens plus one token after that run (the next one to
feed), and trims the KV of the rejected drafts, so the cache then holds exactly the tokens a
plain decode would have fed. A greedy sequence takes the longest run the model's own argmax
agrees with: its answer is the argmax at each position whatever was drafted, so it cannot
change. A sampled one takes its run by rejection sampling (rejection.py): each token it emits
is distributed exactly as the plain sampler's (temperature, top-p, min-p, top-k). Penalties
(repetition, presence, frequency) are applied position by position over the draft, each with
the context the plain decode would have given it, so they too are exact.

Not speculating: seeded sampled requests (a seed must give the same answer run to run, and
the draft lengths follow measured timings, so the random draws would shift with them: such a
request decodes plain, one draw per token, as without speculation), and grammars (structured
outputs, forced tools: their state advances token by token and is not rolled back here).

A draft is made only when it is expected to pay (Leviathan et al., 2023): with the sequence's
acceptance rate a (a decayed count of drafted tokens taken) a draft of k tokens yields
(1 - a^(k+1)) / (1 - a) tokens a pass, and a pass costs verify(k) / plain steps, both measured
on this model and machine (`StepCosts`). The draft length is the k that yields most per unit
of time; when no k beats a plain step, drafting pauses for a growing number of steps, then
looks again. On a GPU a pass of 13 positions costs little more than one step, so drafts pay
at a low acceptance; on a CPU a pass costs ~1.2-2.2 steps (SmolLM2-135M,
benchmarks/diagnostics/verify_cost.py), so chat that does not repeat its prompt decodes
plain. Engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

LONGEST_NGRAM = 4  # the suffix lengths looked up, longest first
SHORTEST_NGRAM = 2  # in the prompt and answer; a prediction is also matched on one token
LONGEST_DRAFT = 12
FIRST_PAUSE, LONGEST_PAUSE = 16, 256  # steps without drafting; doubles each time
DECAY = 0.8  # weight of the past in the acceptance count and the cost fit
PRIOR_TAKEN, PRIOR_TRIALS = 1.0, 1.5  # acceptance 2/3 before any draft: the first one is made
PRIOR_SLOPE = 0.05  # verify cost per drafted token, in plain steps, until two lengths are seen
GAIN_NEEDED = 1.05  # tokens per unit of time over a plain step: below it, no draft
PLAIN_PROBE = 3  # plain steps run to time one, when passes were timed and no plain step was


class StepCosts:
    """What a plain step and a verify pass of k drafts cost on this model and machine, in
    seconds: a decayed mean of plain steps and a decayed least-squares line through the verify
    passes (fixed + per_token * k). One per scheduler (one model), engine thread only."""

    def __init__(self) -> None:
        self.plain: float | None = None
        self._w = self._k = self._t = self._kk = self._kt = 0.0  # decayed sums of the passes

    def saw_plain(self, seconds: float) -> None:
        self.plain = seconds if self.plain is None else DECAY * self.plain + (1 - DECAY) * seconds

    def saw_verify(self, k: int, seconds: float) -> None:
        d = DECAY
        self._w, self._k, self._t = d * self._w + 1, d * self._k + k, d * self._t + seconds
        self._kk, self._kt = d * self._kk + k * k, d * self._kt + k * seconds

    @property
    def unmeasured_plain(self) -> bool:
        """Verify passes were timed but no steady plain step yet: the ratio would rest on its
        prior for good where every step finds a draft (text that repeats its prompt), and
        drafts it cannot afford (a 4-bit model on CUDA: 3-5x slower at 139 tokens/s)."""
        return self.plain is None and self._w > 0

    def describe(self) -> dict:
        """For /health: the costs the gate decides by, in ms (None until measured)."""
        plain = None if self.plain is None else round(self.plain * 1e3, 3)
        verify = {k: round(self.ratio(k) * self.plain * 1e3, 3) for k in (1, 4, 12)} \
            if self.plain is not None and self._w else None
        return {"plain_step_ms": plain, "verify_pass_ms": verify}

    def ratio(self, k: int) -> float:
        """verify(k) / plain step; a cheap guess before both have been seen, so drafting is
        tried and measured."""
        if self.plain is None or self._w == 0:
            return 1.0 + PRIOR_SLOPE * k
        mean_k, mean_t = self._k / self._w, self._t / self._w
        spread = self._kk / self._w - mean_k * mean_k
        slope = (self._kt / self._w - mean_k * mean_t) / spread if spread > 0.5 else None
        if slope is None or slope < 0:
            slope = PRIOR_SLOPE * self.plain
        return max(mean_t + slope * (k - mean_k), self.plain) / self.plain


def expected_tokens(acceptance: float, k: int) -> float:
    """Tokens a verify pass of k drafts yields when each is taken with `acceptance`: the taken
    run plus the model's own token after it."""
    if acceptance >= 1.0:
        return k + 1.0
    return (1 - acceptance ** (k + 1)) / (1 - acceptance)


class NgramIndex:
    """Where each n-gram of a growing token list last occurred, for the continuation that
    followed it. An n-gram is indexed once the token after it exists, so the list's own tail
    is never its own match."""

    def __init__(self, tokens: list[int] | None = None) -> None:
        self.tokens: list[int] = []
        self._after: dict[tuple[int, ...], int] = {}  # n-gram -> where what followed starts
        self.extend(tokens or [])

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            end = len(self.tokens)  # the new token's position: continuation of n-grams before
            for n in range(1, LONGEST_NGRAM + 1):
                if end >= n:
                    self._after[tuple(self.tokens[end - n : end])] = end
            self.tokens.append(token)

    def __contains__(self, ngram: tuple[int, ...]) -> bool:
        """Whether `ngram` occurred with a token after it."""
        return ngram in self._after

    def continuation(self, suffix: tuple[int, ...], k: int) -> list[int]:
        start = self._after.get(suffix)
        return [] if start is None else self.tokens[start : start + k]


@dataclass
class SpeculationFigures:
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of them, taken into the answer
    predicted_drafted: int = 0  # drafted from the request's prediction
    predicted_accepted: int = 0
    by_source: dict = field(default_factory=dict)  # "ngram"/"prediction"/"draft" -> [d, a]


class Drafter:
    """One sequence's draft sources and their adaptive draft lengths. `model`: its draft
    model's state (a DraftSequence), used when it decodes alone; `lookup_alone`: whether prompt
    lookup drafts then too (`--speculate draft`: only in the batch, which has no draft model)."""

    def __init__(self, context: list[int], prediction: list[int] | None, ngram: bool,
                 costs: StepCosts | None = None, model: Any = None,
                 lookup_alone: bool = True) -> None:
        self.context = NgramIndex(context) if ngram else None
        self.model = model
        self.lookup_alone = lookup_alone
        self._seen = list(context)  # the sequence's tokens, for the suffix (without ngram too)
        self.prediction = NgramIndex(prediction) if prediction else None
        self.costs = costs or StepCosts()
        self._taken, self._trials = PRIOR_TAKEN, PRIOR_TRIALS
        self.pause = 0  # steps left without drafting
        self._next_pause = FIRST_PAUSE
        self.figures = SpeculationFigures()
        self._source = "ngram"  # of the last draft

    @property
    def acceptance(self) -> float:
        return self._taken / self._trials

    def best_length(self, limit: int) -> int:
        """The draft length that yields most tokens per unit of time, 0 when none beats a
        plain step."""
        best, best_gain = 0, GAIN_NEEDED
        for k in range(1, min(limit, LONGEST_DRAFT) + 1):
            gain = expected_tokens(self.acceptance, k) / self.costs.ratio(k)
            if gain > best_gain:
                best, best_gain = k, gain
        return best

    def catch_up(self, seen: list[int]) -> None:
        """`seen`: every token of the sequence so far (prompt and taken); those not added
        yet (taken here or in the batch) go into the index."""
        new = seen[len(self._seen) :]
        self._seen.extend(new)
        if self.context is not None:
            self.context.extend(new)

    def propose(self, last: int, limit: int, alone: bool = False) -> list[int]:
        """Up to `limit` tokens to follow `last` (the token after those caught up with);
        `alone`: the sequence decodes alone (its draft model may draft)."""
        if self.costs.unmeasured_plain:
            self.pause = PLAIN_PROBE  # time plain steps before drafting on
            return []
        k = self.best_length(limit)
        if k > 0 and (run := self._looked_up(last, k, ngram=self.lookup_alone or not alone)):
            return run
        model = self.model if alone else None
        if model is not None and (k_model := model.best_length(limit, self.costs,
                                                               self._seen)) > 0:
            self._source = "draft"
            return model.propose(self._seen, last, k_model)
        if limit > 0 and (k <= 0 or model is not None):  # no source pays (or finds one)
            self._rest()
        return []

    def _looked_up(self, last: int, k: int, ngram: bool) -> list[int]:
        """A run from the prediction or (with `ngram`) the sequence itself, after the longest
        suffix found."""
        tail = [*self._seen[-(LONGEST_NGRAM - 1) :], last]
        for n in range(LONGEST_NGRAM, 0, -1):
            suffix = tuple(tail[-n:])
            if len(suffix) < n:
                continue
            if self.prediction is not None and (run := self.prediction.continuation(suffix, k)):
                self._source = "prediction"
                return run
            if ngram and self.context is not None and n >= SHORTEST_NGRAM and (
                run := self.context.continuation(suffix, k)
            ):
                self._source = "ngram"
                return run
        return []

    def verified(self, drafted: int, accepted: int) -> None:
        """How a draft of `drafted` tokens fared: the next draft's length, or a pause."""
        f = self.figures
        f.drafted += drafted
        f.accepted += accepted
        counts = f.by_source.setdefault(self._source, [0, 0])
        counts[0], counts[1] = counts[0] + drafted, counts[1] + accepted
        if self._source == "prediction":
            f.predicted_drafted += drafted
            f.predicted_accepted += accepted
        if self._source == "draft":  # its own count, and its cache cut back to what was taken
            self.model.verified(drafted, accepted)
        else:  # a run of `accepted` successes, then one failure unless all were taken
            self._taken = DECAY * self._taken + accepted
            self._trials = DECAY * self._trials + accepted + (accepted < drafted)
        if accepted:
            self._next_pause = FIRST_PAUSE

    def rested(self, tail: list[int]) -> None:
        """One plain step of a pause (`tail`: the sequence's last tokens, at least
        LONGEST_NGRAM). The pause ends early where those recur earlier in the sequence: a
        copy has resumed (an edit given back past its changed lines), and a pause grown to
        LONGEST_PAUSE steps would miss it. Looking costs a dict lookup, no read of the GPU."""
        self.pause -= 1
        if self.pause > 0 and self.context is not None and len(tail) >= LONGEST_NGRAM \
                and tuple(tail[-LONGEST_NGRAM:]) in self.context:
            self.pause = 0

    def _rest(self) -> None:
        """No draft pays now: decode plain for a while (longer each time), then look again
        with the acceptance count back at its prior, so a sequence that starts repeating its
        prompt later is drafted for again."""
        self.pause = self._next_pause
        self._next_pause = min(self._next_pause * 2, LONGEST_PAUSE)
        self._taken, self._trials = PRIOR_TAKEN, PRIOR_TRIALS
        if self.model is not None:
            self.model.rest()


def can_speculate(seq: Any, mode: str, cache: list[Any]) -> bool:
    """Whether this sequence's answer can be drafted without changing it (or, sampled, its
    distribution): greedy, or sampled without a seed; penalties but no grammar; a cache that
    can be cut back."""
    from mlx_lm.models.cache import can_trim_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler

    from mlxc.engine.decode.grammar_mask import GrammarProcessor

    request = seq.request
    greedy = seq.sampling.sampler is greedy_sampler
    if mode == "off" or not (greedy or (request.temperature > 0 and request.seed is None)):
        return False
    if any(isinstance(p, GrammarProcessor) for p in seq.sampling.processors):
        return False
    return bool(cache) and can_trim_prompt_cache(cache)


def drafter_for(seq: Any, mode: str, costs: StepCosts | None = None,
                draft: Any = None) -> Drafter:
    """`draft`: the engine's DraftModel, if it has one (used by auto and draft)."""
    drafter = Drafter(seq.prompt, seq.prediction, ngram=mode != "off", costs=costs,
                      lookup_alone=mode != "draft")
    attach_draft(drafter, mode, draft)
    return drafter


def attach_draft(drafter: Drafter, mode: str, draft: Any) -> None:
    """Give a drafter made in the batch (no draft model there) its draft model's state once
    the sequence decodes alone."""
    if draft is not None and drafter.model is None and mode in ("auto", "draft"):
        from mlxc.engine.decode.draft_model import DraftSequence

        drafter.model = DraftSequence(draft)


def verified_logprobs(model: Any, cache: list[Any], last: Any, draft: list[int],
                      processors: list[Any] = (), context: Any = None) -> Any:
    """Feed `last` (an mx.array of shape (1,)) and `draft` in one pass: the log-probability
    rows (k+1, vocab) after each position, lazy. With `processors` (penalties), row j is
    processed with `context` (the tokens fed before `last`) plus the j+1 tokens fed up to it,
    as the plain decode processes that position. The caller trims the cache by the drafts it
    rejects."""
    import mlx.core as mx

    tokens = mx.concatenate([last, mx.array(draft, dtype=last.dtype)])
    logits = model(tokens[None], cache=cache)[0]
    if processors:
        seen = mx.concatenate([context, tokens.astype(context.dtype)])
        rows = []
        for j in range(len(draft) + 1):
            row = logits[j : j + 1]
            for processor in processors:
                row = processor(seen[: context.size + j + 1], row)
            rows.append(row)
        logits = mx.concatenate(rows)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def verify(model: Any, cache: list[Any], last: Any, draft: list[int],
           processors: list[Any] = (), context: Any = None) -> tuple[list[int], Any]:
    """The greedy verify: (the model's argmax after each of the k+1 positions, their
    log-probability rows (k+1, vocab)), evaluated."""
    import mlx.core as mx

    logprobs = verified_logprobs(model, cache, last, draft, processors, context)
    best = mx.argmax(logprobs, axis=-1)
    mx.eval(best, logprobs)
    return best.tolist(), logprobs


def accepted_run(draft: list[int], best: list[int]) -> int:
    """How many leading drafted tokens the model's own choices agree with."""
    n = 0
    while n < len(draft) and draft[n] == best[n]:
        n += 1
    return n

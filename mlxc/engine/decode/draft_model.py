"""Draft-model speculation (`--draft-model PATH`): a smaller model with the target's tokenizer
drafts k tokens greedily, the target verifies them in one pass (decode/speculate.py's verify,
the same for every draft source), and the draft's own KV cache is cut back to what was taken.

Each speculating sequence has its own draft cache (mlx-lm's `make_prompt_cache` of the draft
model), which holds a prefix of the sequence's tokens (`fed`). Before a draft it is brought up
to the sequence: cut back to the longest prefix it shares with it, then fed the rest in one
pass (the whole prompt at the first draft: the draft's own prefill, paid at the sequence's
first draft step, after its first token is out; mlxc's prefix cache does not keep draft
states). Each drafted token is the draft's argmax after the one before it; the k passes are
queued lazily and evaluated once. After the verify pass the cache is trimmed
(`trim_prompt_cache`) to the tokens the target took, so it holds exactly them.

Greedy drafts are point masses, so a sampled sequence's rejection sampling (decode/rejection.py)
keeps the target's distribution as with prompt lookup.

Whether a draft pays: with the draft's acceptance a (a decayed count per sequence, as
speculate.py's Drafter keeps) a pass yields (1 - a^(k+1)) / (1 - a) tokens for verify(k) + k
drafted tokens, all measured: verify(k) by `StepCosts`, a drafted token's time by
`DraftModel.saw` (the draft steps of each proposal over the tokens drafted). A catch-up (the
whole prompt at a sequence's first draft, a stretch decoded in the batch) is charged once, at
its measured rate per token: drafting starts only when the answer still to come (at most the
tokens max_tokens leaves) would win back that prefill, so a short answer to a long prompt
decodes plain instead of paying the draft's prefill first. Engine thread only.
"""

from __future__ import annotations

import time
from typing import Any

from mlxc.engine.decode.speculate import (
    DECAY,
    GAIN_NEEDED,
    LONGEST_DRAFT,
    PRIOR_TAKEN,
    PRIOR_TRIALS,
    StepCosts,
    expected_tokens,
)

PRIOR_DRAFT_SHARE = 0.3  # a drafted token's cost in plain target steps, until one is measured
CATCH_UP_TIMED = 2  # proposals that feed more than this many tokens first are prefills, not timed
PREFILL_STEP = 512  # tokens per pass when the draft catches up on a long prompt
PRIOR_PREFILL_SHARE = 0.05  # a caught-up token's cost in plain target steps, until measured


class DraftModel:
    """The engine's draft model, what one drafted token costs on it (seconds, measured), and
    how much prefilling its sequences' caches has cost. One per engine."""

    def __init__(self, model: Any, name: str) -> None:
        self.model = model
        self.name = name
        self.seconds_per_token: float | None = None
        self.prefilled_tokens = 0  # tokens fed to catch up (prompts, batch stretches)
        self.prefill_seconds = 0.0
        self.seconds_per_prefilled: float | None = None  # a caught-up token's, decayed

    def saw_prefill(self, tokens: int, seconds: float) -> None:
        self.prefilled_tokens += tokens
        self.prefill_seconds += seconds
        per, old = seconds / tokens, self.seconds_per_prefilled
        self.seconds_per_prefilled = per if old is None else DECAY * old + (1 - DECAY) * per

    def saw(self, tokens: int, seconds: float) -> None:
        per = seconds / tokens
        old = self.seconds_per_token
        self.seconds_per_token = per if old is None else DECAY * old + (1 - DECAY) * per

    def share(self, costs: StepCosts) -> float:
        """A drafted token's cost in plain target steps."""
        if self.seconds_per_token is None or not costs.plain:
            return PRIOR_DRAFT_SHARE
        return self.seconds_per_token / costs.plain

    def prefill_share(self, costs: StepCosts) -> float:
        """A caught-up token's cost in plain target steps."""
        if self.seconds_per_prefilled is None or not costs.plain:
            return PRIOR_PREFILL_SHARE
        return self.seconds_per_prefilled / costs.plain

    def figures(self) -> dict[str, Any]:
        per = self.seconds_per_token
        return {"name": self.name,
                "ms_per_drafted_token": round(per * 1000, 2) if per is not None else None,
                "prefilled_tokens": self.prefilled_tokens,
                "prefill_seconds": round(self.prefill_seconds, 3),
                "in_batch": "prompt lookup"}  # batch rows do not draft with it (see docs)


class DraftSequence:
    """One sequence's draft state: its draft cache, the tokens it holds, its acceptance."""

    def __init__(self, draft: DraftModel) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.draft = draft
        self.cache = make_prompt_cache(draft.model)
        self.fed: list[int] = []  # the tokens `cache` holds, in order
        self._taken, self._trials = PRIOR_TAKEN, PRIOR_TRIALS
        self._drafted = 0  # length of the last draft, for `verified`

    @property
    def acceptance(self) -> float:
        return self._taken / self._trials

    def best_length(self, limit: int, costs: StepCosts, seen: list[int] | None = None) -> int:
        """The draft length that yields most tokens per unit of time, counting the draft's own
        steps; 0 when none beats a plain step by GAIN_NEEDED, or when catching up on `seen`
        (the sequence's tokens) costs more than drafting the `limit` tokens left could win."""
        share = self.draft.share(costs)
        best, best_gain = 0, GAIN_NEEDED
        for k in range(1, min(limit, LONGEST_DRAFT) + 1):
            gain = expected_tokens(self.acceptance, k) / (costs.ratio(k) + k * share)
            if gain > best_gain:
                best, best_gain = k, gain
        if best and seen is not None and (behind := self.behind(seen)) > CATCH_UP_TIMED:
            # in plain steps: `limit` plain, against the catch-up and then `limit` / gain
            if behind * self.draft.prefill_share(costs) + limit / best_gain >= limit:
                return 0
        return best

    def behind(self, seen: list[int]) -> int:
        """Tokens a draft after `seen` (and the pending one) would feed first."""
        return len(seen) + 1 - _common_prefix(self.fed, seen)

    def propose(self, seen: list[int], last: int, k: int) -> list[int]:
        """k tokens to follow `last`, which follows `seen` (every token of the sequence
        before it)."""
        import mlx.core as mx

        started = time.perf_counter()
        self.keep(_common_prefix(self.fed, seen))
        feed = [*seen[len(self.fed):], last]
        drafted = [mx.argmax(self._feed(feed), axis=-1)]
        passes = k  # timed draft passes: a catch-up longer than a step or two is a prefill
        if len(feed) > CATCH_UP_TIMED:
            mx.eval(drafted[0])
            self.draft.saw_prefill(len(feed), time.perf_counter() - started)
            started, passes = time.perf_counter(), k - 1
        for _ in range(k - 1):  # queued lazily: one evaluation for the whole draft
            logits = self.draft.model(drafted[-1][None], cache=self.cache)[:, -1, :]
            drafted.append(mx.argmax(logits, axis=-1))
        tokens = mx.concatenate(drafted).tolist()
        if passes:
            self.draft.saw(passes, time.perf_counter() - started)
        self.fed = [*seen, last, *tokens[:-1]]  # the last drafted token is not fed yet
        self._drafted = k
        return tokens

    def verified(self, drafted: int, accepted: int) -> None:
        """The target took `accepted` of the `drafted` tokens: cut the cache back to what
        was taken (the pending token and the accepted drafts), and count them."""
        fed_drafts = drafted - 1  # the last drafted token was never fed
        self.keep(len(self.fed) - fed_drafts + min(accepted, fed_drafts))
        self._taken = DECAY * self._taken + accepted
        self._trials = DECAY * self._trials + accepted + (accepted < drafted)

    def rest(self) -> None:
        self._taken, self._trials = PRIOR_TAKEN, PRIOR_TRIALS

    def keep(self, n: int) -> None:
        """Cut the cache back to its first n tokens."""
        if n < len(self.fed):
            from mlx_lm.models.cache import trim_prompt_cache

            trim_prompt_cache(self.cache, len(self.fed) - n)
            del self.fed[n:]

    def _feed(self, tokens: list[int]) -> Any:
        """Feed `tokens` (long ones in chunks); the logits after the last, lazy."""
        import mlx.core as mx

        model = self.draft.model
        while len(tokens) > PREFILL_STEP:
            model(mx.array([tokens[:PREFILL_STEP]]), cache=self.cache)
            mx.eval([c.state for c in self.cache])
            tokens = tokens[PREFILL_STEP:]
        return model(mx.array([tokens]), cache=self.cache)[:, -1, :]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    i = 0
    while a[i] == b[i]:
        i += 1
    return i


def tokenizer_difference(target: Any, draft: Any) -> str | None:
    """What makes two tokenizers' ids mean different things (vocabulary, end tokens); None
    when they are the same."""
    tv, dv = target.get_vocab(), draft.get_vocab()
    if len(tv) != len(dv):
        return f"vocabularies of {len(tv)} and {len(dv)} tokens"
    if tv != dv:
        by_id = {i: t for t, i in dv.items()}
        differ = sorted(i for t, i in tv.items() if by_id.get(i) != t)
        i = differ[0] if differ else 0
        return (f"{len(differ) or 'some'} token ids mean different strings, e.g. id {i}: "
                f"{_token_at(tv, i)!r} and {by_id.get(i)!r}")
    te, de = set(target.eos_token_ids), set(draft.eos_token_ids)
    if te != de:
        return f"end tokens {sorted(te)} and {sorted(de)}"
    return None


def _token_at(vocab: dict[str, int], i: int) -> str | None:
    return next((t for t, j in vocab.items() if j == i), None)

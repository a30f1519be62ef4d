"""Speculative decoding of one greedy sequence: drafts from prompt lookup (n-grams of the
sequence's own prompt and answer) and from a client's Predicted Output, verified in one pass.

A step with a draft feeds the token not yet fed and the k drafted tokens after it in one pass
of k+1 positions, takes the longest run of drafted tokens the model's own argmax agrees with,
plus the model's token after that run (the next one to feed), and trims the KV of the
rejected drafts, so the cache then holds exactly the tokens a plain decode would have fed.
Only greedy sequences without logits processors speculate (sampling.py decides nothing
here): their answer is the argmax at each position whatever was drafted, so it cannot change.

Adaptive per sequence: the draft length grows while drafts are taken whole and shrinks to
what was taken when they are not; after a few drafts in a row that miss at once, drafting
pauses for a growing number of steps, so chat that does not repeat its prompt decodes plain.
Engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

LONGEST_NGRAM = 4  # the suffix lengths looked up, longest first
SHORTEST_NGRAM = 2  # in the prompt and answer; a prediction is also matched on one token
FIRST_DRAFT, SHORTEST_DRAFT, LONGEST_DRAFT = 6, 2, 12
MISSES_BEFORE_PAUSE = 3  # drafts in a row that miss at once
FIRST_PAUSE, LONGEST_PAUSE = 16, 256  # steps without drafting; doubles each time


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

    def continuation(self, suffix: tuple[int, ...], k: int) -> list[int]:
        start = self._after.get(suffix)
        return [] if start is None else self.tokens[start : start + k]


@dataclass
class SpeculationFigures:
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of them, taken into the answer
    predicted_drafted: int = 0  # drafted from the request's prediction
    predicted_accepted: int = 0


class Drafter:
    """One sequence's draft source and its adaptive draft length."""

    def __init__(self, context: list[int], prediction: list[int] | None, ngram: bool) -> None:
        self.context = NgramIndex(context) if ngram else None
        self._seen = list(context)  # the sequence's tokens, for the suffix (without ngram too)
        self.prediction = NgramIndex(prediction) if prediction else None
        self.length = FIRST_DRAFT
        self.misses = 0
        self.pause = 0  # steps left without drafting
        self._next_pause = FIRST_PAUSE
        self.figures = SpeculationFigures()
        self._from_prediction = False

    def catch_up(self, seen: list[int]) -> None:
        """`seen`: every token of the sequence so far (prompt and taken); those not added
        yet (taken here or in the batch) go into the index."""
        new = seen[len(self._seen) :]
        self._seen.extend(new)
        if self.context is not None:
            self.context.extend(new)

    def propose(self, last: int, limit: int) -> list[int]:
        """Up to `limit` tokens to follow `last` (the token after those caught up with)."""
        k = min(self.length, limit)
        if k <= 0:
            return []
        tail = [*self._seen[-(LONGEST_NGRAM - 1) :], last]
        for n in range(LONGEST_NGRAM, 0, -1):
            suffix = tuple(tail[-n:])
            if len(suffix) < n:
                continue
            if self.prediction is not None and (run := self.prediction.continuation(suffix, k)):
                self._from_prediction = True
                return run
            if self.context is not None and n >= SHORTEST_NGRAM and (
                run := self.context.continuation(suffix, k)
            ):
                self._from_prediction = False
                return run
        return []

    def verified(self, drafted: int, accepted: int) -> None:
        """How a draft of `drafted` tokens fared: the next draft's length, or a pause."""
        f = self.figures
        f.drafted += drafted
        f.accepted += accepted
        if self._from_prediction:
            f.predicted_drafted += drafted
            f.predicted_accepted += accepted
        if accepted == drafted:
            self.length = min(self.length + 2, LONGEST_DRAFT)
        else:
            self.length = max(accepted + 1, SHORTEST_DRAFT)
        self.misses = self.misses + 1 if accepted == 0 else 0
        if self.misses >= MISSES_BEFORE_PAUSE:
            self.pause, self.misses = self._next_pause, 0
            self._next_pause = min(self._next_pause * 2, LONGEST_PAUSE)
        elif accepted:
            self._next_pause = FIRST_PAUSE


def can_speculate(seq: Any, mode: str, cache: list[Any]) -> bool:
    """Whether this sequence's answer can be drafted without changing it: greedy, no logits
    processors (penalties, grammars), a cache that can be cut back."""
    from mlx_lm.models.cache import can_trim_prompt_cache
    from mlx_lm.sample_utils import greedy_sampler

    if mode == "off" or seq.sampling.sampler is not greedy_sampler or seq.sampling.processors:
        return False
    return bool(cache) and can_trim_prompt_cache(cache)


def drafter_for(seq: Any, mode: str) -> Drafter:
    return Drafter(seq.prompt, seq.prediction, ngram=mode in ("auto", "ngram"))


def verify(model: Any, cache: list[Any], last: Any, draft: list[int]) -> tuple[list[int], Any]:
    """Feed `last` (an mx.array of shape (1,)) and `draft` in one pass: (the model's argmax
    after each of the k+1 positions, their log-probability rows (k+1, vocab)). The caller
    trims the cache by the drafts it rejects."""
    import mlx.core as mx

    tokens = mx.concatenate([last, mx.array(draft, dtype=last.dtype)])
    logits = model(tokens[None], cache=cache)[0]
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    best = mx.argmax(logprobs, axis=-1)
    mx.eval(best, logprobs)
    return best.tolist(), logprobs


def accepted_run(draft: list[int], best: list[int]) -> int:
    """How many leading drafted tokens the model's own choices agree with."""
    n = 0
    while n < len(draft) and draft[n] == best[n]:
        n += 1
    return n

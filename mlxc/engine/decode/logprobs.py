"""Log-probability entries: one per token, as the answer and the prompt (echo) carry them.

An entry is `{"id", "token", "bytes", "logprob", "top_logprobs": [{"id", "token", "bytes",
"logprob"}, ...]}`; each API adapter reshapes it (OpenAI chat's `content` list, completions'
parallel lists). `bytes` are the token's own bytes, also when it holds part of a character.
"""

from __future__ import annotations

from typing import Any

# JSON has no -inf; OpenAI reports tokens a constraint forbids with this floor too.
LOGPROB_FLOOR = -9999.0


class TokenNames:
    """A token's text and bytes, decoded once per id and remembered (engine thread)."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._known: dict[int, tuple[str, list[int]]] = {}
        self._byte_level = type(getattr(tokenizer, "detokenizer", None)).__name__ == (
            "BPEStreamingDetokenizer"
        )

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if (known := self._known.get(token)) is None:
            known = self._known[token] = self._decode(token)
        return known

    def _decode(self, token: int) -> tuple[str, list[int]]:
        raw = None
        if self._byte_level:  # GPT-2 style: each character of the piece stands for one byte
            from mlx_lm.tokenizer_utils import _byte_decoder

            piece, table = self._tokenizer.convert_ids_to_tokens(token), _byte_decoder()
            if isinstance(piece, str) and all(c in table for c in piece):
                raw = bytes(table[c] for c in piece)
        if raw is None:
            raw = self._tokenizer.decode([token]).encode()
        return raw.decode("utf-8", "replace"), list(raw)


def _value(logprob: float) -> float:
    return max(float(logprob), LOGPROB_FLOOR)


def entry(names: TokenNames, token: int, logprob: float, top: list[tuple[int, float]]) -> dict:
    text, raw = names(token)
    return {
        "id": token, "token": text, "bytes": raw, "logprob": _value(logprob),
        "top_logprobs": [
            {"id": t, "token": names(t)[0], "bytes": names(t)[1], "logprob": _value(lp)}
            for t, lp in top
        ],
    }


def top_of(row: Any, k: int) -> tuple[list[int], list[float]]:
    """The k most likely tokens of a log-prob row (mx.array, 1-D), most likely first."""
    import mlx.core as mx

    if k <= 0:
        return [], []
    k = min(k, row.size)
    ids = mx.argpartition(-row, k - 1)[:k]
    values = row[ids]
    order = mx.argsort(-values)
    return ids[order].tolist(), values[order].tolist()


class LogprobRecorder:
    """Entries for the sampled tokens of one sequence, handed out in order."""

    def __init__(self, tokenizer: Any, top: int) -> None:
        self._names = TokenNames(tokenizer)
        self._top = top
        self.entries: list[dict] = []
        self._taken = 0

    def observe(self, token: int, row: Any) -> None:
        import mlx.core as mx

        row = row.reshape(-1).astype(mx.float32)
        ids, values = top_of(row, self._top)
        top = list(zip(ids, values, strict=True))
        self.entries.append(entry(self._names, token, row[token].item(), top))

    def take(self) -> list[dict]:
        new, self._taken = self.entries[self._taken :], len(self.entries)
        return new

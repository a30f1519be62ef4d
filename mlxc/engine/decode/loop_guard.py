"""A loop guard for grammar-held JSON: inside a string or a number the grammar allows almost
any token, and a small model stuck in a loop there writes until max_tokens, so the answer is
cut and does not parse (SmolLM2-135M's forced tool calls: `"to":"<email_name_here_to_send_
email_here_to_send_email_here...`, `"max_results":1000000000000...`; LangChain's
`with_structured_output` then raises LengthFinishReasonError).

Once the value's last tokens are one unit repeated back to back — at least MIN_RUN tokens and
three units — only the tokens that end the value stay allowed (those the grammar allows there:
a closing quote for a string, a delimiter for a number), so the answer goes on with the rest
of the schema. An answer that would have been valid is left alone unless it holds such a run
inside one string or number, which prose, names, code and figures do not (16 identical digits,
or a phrase said three times over 16 tokens). Nothing changes where the grammar does not allow
the value to end (a minLength not reached, a pattern): there it keeps its own bound.
Engine thread only, one per sequence; the tables are built once per tokenizer."""

from __future__ import annotations

import threading
import weakref
from typing import Any

import numpy as np

MIN_RUN = 16  # tokens of repetition before a value is closed: past any repeat a valid one holds
MAX_UNIT = 16  # the longest repeated unit looked for, in tokens
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_NUMBER_START, _NUMBER_MORE = frozenset(b"-0123456789"), frozenset(b"-+.eE0123456789")

_tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class Tables:
    """Per tokenizer: each token's bytes, and which tokens end a string or a number."""

    def __init__(self, lltokenizer: Any, vocab: int) -> None:
        self.bytes = [lltokenizer.decode_bytes([t]) for t in range(vocab)]
        self.ends_string = np.zeros(vocab, dtype=bool)  # holds an unescaped quote
        self.ends_number = np.zeros(vocab, dtype=bool)  # starts with what no number holds
        for token, data in enumerate(self.bytes):
            self.ends_number[token] = bool(data) and data[0] not in _NUMBER_MORE
            escaped = False
            for byte in data:
                if escaped:
                    escaped = False
                elif byte == _BACKSLASH:
                    escaped = True
                elif byte == _QUOTE:
                    self.ends_string[token] = True
                    break


def tables_for(tokenizer: Any, lltokenizer: Any, vocab: int) -> Tables:
    """Built once per tokenizer (~0.1 s for a 49k vocabulary)."""
    with _lock:
        if (known := _tables.get(tokenizer)) is None:
            known = _tables[tokenizer] = Tables(lltokenizer, vocab)
        return known


class LoopGuard:
    def __init__(self, tables: Tables) -> None:
        self._tables = tables
        self._in_string = self._escaped = self._in_number = False
        self._value: list[int] = []  # the tokens of the string or number being written

    def consume(self, token: int) -> None:
        """Follow the answer's JSON lexically, one generated token at a time."""
        data = self._tables.bytes[token] if token < len(self._tables.bytes) else b""
        for byte in data:
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif byte == _BACKSLASH:
                    self._escaped = True
                elif byte == _QUOTE:
                    self._in_string = False
            elif byte == _QUOTE:
                self._in_string, self._in_number = True, False
                self._value.clear()
            elif byte in (_NUMBER_MORE if self._in_number else _NUMBER_START):
                if not self._in_number:
                    self._in_number = True
                    self._value.clear()
            else:
                self._in_number = False
        if self._in_string or self._in_number:
            self._value.append(token)
            if len(self._value) > 4 * MAX_UNIT:  # `looping` reads 3 units at most
                del self._value[: -3 * MAX_UNIT]
        else:
            self._value.clear()

    def looping(self) -> bool:
        """Whether the value ends in one unit repeated: MIN_RUN tokens and three units."""
        value, n = self._value, len(self._value)
        for unit in range(1, MAX_UNIT + 1):
            run = max(MIN_RUN, 3 * unit)
            if n < run:
                break
            if all(value[j] == value[j - unit] for j in range(n - run + unit, n)):
                return True
        return False

    def restrict(self, allowed: np.ndarray) -> np.ndarray:
        """`allowed` (the grammar's mask, one bool a token), less what would go on looping."""
        if self._escaped or not (self._in_string or self._in_number) or not self.looping():
            return allowed
        ends = self._tables.ends_string if self._in_string else self._tables.ends_number
        width = min(allowed.size, ends.size)
        closing = allowed.copy()
        closing[:width] &= ends[:width]
        closing[width:] = False
        return closing if closing.any() else allowed

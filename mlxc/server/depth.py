"""How deeply a JSON text nests, measured before parsing: Python's json parser recurses, so
a body of 100,000 `[` would raise RecursionError deep inside it (a 500), and pydantic and
the chat template walk whatever it returns. Requests nest a few levels (tool schemas a few
dozen); anything past MAX_DEPTH is refused with a 400."""

from __future__ import annotations

import re
from itertools import accumulate

MAX_DEPTH = 64
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)  # JSON strings, escapes included
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_depth(raw: bytes) -> int:
    """The deepest nesting of arrays and objects in `raw` (brackets inside strings do not
    count). Linear time; for malformed text, an upper bound."""
    brackets = _STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0)

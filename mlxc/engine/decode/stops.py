"""Stop sequences on streamed text: cut at the first stop string, and hold back only the tail
that could still turn out to be the start of one, so streams never show a partial stop."""

from __future__ import annotations


class StopMatcher:
    def __init__(self, stops: list[str]) -> None:
        self.stops = [s for s in stops if s]
        self._hold = max((len(s) for s in self.stops), default=1) - 1
        self._pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text, if one did

    def feed(self, segment: str) -> tuple[str, bool]:
        """Add text; return what is safe to show now, and whether a stop string was hit."""
        if self.stopped:
            return "", True
        self._pending += segment
        hits = [(i, s) for s in self.stops if (i := self._pending.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits, key=lambda hit: hit[0])
            emit, self._pending = self._pending[:at], ""
            self.stopped = True
            return emit, True
        if self._hold == 0:
            emit, self._pending = self._pending, ""
        else:
            cut = max(0, len(self._pending) - self._hold)
            emit, self._pending = self._pending[:cut], self._pending[cut:]
        return emit, False

    def flush(self) -> str:
        """The held-back tail, once generation ends without a stop."""
        tail, self._pending = self._pending, ""
        return "" if self.stopped else tail

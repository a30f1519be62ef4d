"""How a prompt prefilled beside running streams is paced: each of its chunks waits until the
streams have had their share of the time it is expected to take (batch/scheduler.py, step 2).

Engine thread only.
"""

from __future__ import annotations

from typing import Any

# Of the engine's time while a prompt prefills beside running streams, the share they get.
# Over half: their steps run ~7% slower between chunks than alone (2-core CPU: 60.9 vs 56.9
# ms), so at half they kept 0.45-0.48 of their speed; the long prompt's first token comes ~11%
# later than at half (1/0.45 vs 1/0.5 of its prefill time).
DECODE_SHARE = 0.55


class PrefillPacing:
    def __init__(self) -> None:
        self.owed = 0.0  # decode seconds due before the next prompt chunk
        self._rate = 0.0  # seconds per prompt token, expected of the next chunk
        self._last_chunk = (0, 0.0)  # id of the sequence it was of, and its rate

    def learn(self, seq: Any, rate: float) -> None:
        """The next chunk's expected cost per token: deeper chunks cost more (attention reads
        all before them), so the growth since this prompt's chunk before is added once more."""
        last_seq, last_rate = self._last_chunk
        growth = rate - last_rate if last_seq == id(seq) else 0.0
        self._rate = rate + max(growth, 0.0)
        self._last_chunk = (id(seq), rate)  # not the sequence: its state is freed when done

    def share_before(self, seq: Any) -> float:
        """The running streams' decode time due before `seq`'s next prompt chunk."""
        if seq is None:
            return 0.0
        expected = seq.prefill.next_tokens() * self._rate
        return expected * DECODE_SHARE / (1 - DECODE_SHARE)

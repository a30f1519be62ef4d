"""The prefix cache's memory tier: mlx-lm's `LRUPromptCache` (trie + LRU + byte budget),
used without the deep copy its own `fetch_nearest_cache` makes on every hit.

A state that the new prompt extends is *taken* (removed from the tier, trimmed in place,
extended by the generation and stored again under the longer key): no copy at all. A state
that diverges from the prompt is shared as a view of its first tokens, which MLX copies when
the generation appends to it (only the reused prefix, never the whole state).
Engine thread only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import LRUPromptCache, PromptTrie

# Kinds that can always be rewound; rotating (sliding-window) and recurrent caches cannot.
ALWAYS_TRIMMABLE = {"KVCache", "QuantizedKVCache", "ConcatenateKVCache"}


@dataclass
class Match:
    key: list[int]
    reuse: int  # prompt tokens whose state this entry provides


def best_match(trie: PromptTrie, model: Any, tokens: list[int], trimmable: bool) -> Match | None:
    """The entry that provides the longest prefix of `tokens`, leaving at least one token to
    feed (an exact repeat reuses all but the last token, never falls back to a cold prefill)."""
    if trimmable:
        found = trie.search(model, tokens)
        options = []
        if found.exact is not None:
            options.append(Match(found.exact, len(tokens) - 1))
        if found.shorter is not None:
            options.append(Match(found.shorter, len(found.shorter)))
        if found.longer is not None:
            options.append(Match(found.longer, min(found.common_prefix, len(tokens) - 1)))
        return max(options, key=lambda m: m.reuse, default=None)
    found = trie.search(model, tokens[:-1])  # untrimmable: only an exact prefix will do
    key = found.exact if found.exact is not None else found.shorter
    return Match(key, len(key)) if key is not None else None


def cache_length(cache: list[Any]) -> int | None:
    """Tokens a state holds, when its layers say so (recurrent layers do not)."""
    for layer in cache:
        if hasattr(layer, "offset"):
            return int(layer.offset)
    return None


class MemoryTier(LRUPromptCache):
    """mlx-lm's trie + LRU with a byte budget, plus taking and sharing entries without the
    deep copy its own `fetch_nearest_cache` makes."""

    def __init__(self, max_bytes: int, model_key: str) -> None:
        super().__init__(max_size=1 << 20, max_bytes=max_bytes)
        self.model_key = model_key

    def best(self, tokens: list[int], trimmable: bool) -> Match | None:
        return best_match(self._trie, self.model_key, tokens, trimmable)

    def take(self, key: list[int]) -> LRUPromptCache.CacheEntry:
        """Remove an entry and hand its state over: the caller extends it and stores it back."""
        entry = self._trie.pop(self.model_key, key)
        self._lru.remove(self.model_key, key)
        self._n_bytes -= entry.nbytes
        self._n_bytes_by_type[entry.cache_type] -= entry.nbytes
        return entry

    def peek(self, key: list[int]) -> LRUPromptCache.CacheEntry:
        """An entry, left in place and marked as recently used."""
        entry = self._trie.get(self.model_key, key)
        self._lru.remove(self.model_key, key)
        self._lru.push(self.model_key, key, entry.cache_type)
        return entry

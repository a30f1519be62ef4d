"""The prefix (KV) cache: token prefix -> the model's KV state after it, in memory and on disk,
so a follow-up turn or a shared system prompt prefills only the tokens it has not seen.

Engine thread only, except `stats()`, which reads plain Python numbers from any thread.

- Memory tier: mlx-lm's `LRUPromptCache` (trie + LRU + byte budget), used without its deep
  copy on every hit. A state that the new prompt extends is *taken* (removed from the tier,
  trimmed in place, extended by the generation and stored again under the longer key), so no
  copy at all; a state that diverges from the prompt is shared as a view of its first tokens,
  which MLX copies-on-write when the generation appends to it (only the reused prefix).
- Disk tier (prefix_disk.py): every stored state is written through, so it survives restarts.
- Caches that cannot be trimmed (sliding window, recurrent): states are also kept at message
  boundaries (end of the system prompt, end of the conversation before the answer).
"""

from __future__ import annotations

import copy
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import (
    LRUPromptCache,
    PromptTrie,
    make_prompt_cache,
    trim_prompt_cache,
)

from mlxc.config import Settings
from mlxc.engine.prefix_disk import DiskTier, state_nbytes
from mlxc.engine.prefix_index import COUNTERS, read_stats, summarize

ALWAYS_TRIMMABLE = {"KVCache", "QuantizedKVCache", "ConcatenateKVCache"}
MIN_REUSE = 8  # fewer shared tokens (a chat template's header) are not worth a lookup
MEMORY_SHARE = 0.25  # of the memory available at start, when no budget is set


def default_memory_budget() -> int:
    """A quarter of the memory the machine has available now (2 GB if that is unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(int(line.split()[1]) * 1024 * MEMORY_SHARE)
    except OSError:
        pass
    try:  # macOS and other Unixes: total physical memory, halved as a stand-in for "free"
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return int(total * MEMORY_SHARE / 2)
    except (ValueError, OSError, AttributeError):
        return 2 << 30


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


def prefix_view(cache: list[Any], n: int) -> list[Any]:
    """The state of the first n tokens, sharing the arrays (MLX copies when one is written)."""
    out = []
    for layer in cache:
        if type(layer).__name__ in ALWAYS_TRIMMABLE:
            view = copy.copy(layer)
            view.keys = _head(layer.keys, n)
            view.values = _head(layer.values, n)
            view.offset = n
        else:
            view = copy.deepcopy(layer)
            view.trim(view.offset - n)
        out.append(view)
    return out


def _head(x: Any, n: int) -> Any:
    return tuple(_head(a, n) for a in x) if isinstance(x, tuple) else x[..., :n, :]


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


class PrefixCache:
    """What the engine asks: `fetch` a state for a prompt, `store` it after generating."""

    def __init__(
        self, model: Any, tokenizer: Any, fingerprint: str | None, settings: Settings,
        prefill_step_size: int = 512,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint or "unknown"
        self.step = prefill_step_size
        self.classes = [type(c).__name__ for c in make_prompt_cache(model)]
        self.trimmable = all(name in ALWAYS_TRIMMABLE for name in self.classes)
        budget = settings.prefix_memory_bytes
        self.memory_limit = default_memory_budget() if budget is None else budget
        self.memory = (
            MemoryTier(self.memory_limit, self.fingerprint) if self.memory_limit > 0 else None
        )
        self.disk_limit = settings.prefix_disk_bytes if fingerprint else 0
        self.directory = settings.prefix_dir
        self.disk = (
            DiskTier(self.directory, self.fingerprint, self.disk_limit, self.classes)
            if self.disk_limit > 0 else None
        )
        base = self.disk.index.counters() if self.disk else read_stats(self.directory)
        self.totals = Counter({name: base[name] for name in COUNTERS})
        self._unsaved: Counter = Counter()
        self.last_reused = 0  # prompt tokens the last fetch took from a tier (not prefilled)

    # -- lookup ------------------------------------------------------------------------------

    def fetch(self, tokens: list[int], request: Any = None, count: bool = True):
        """(state to extend, tokens still to prefill): the longest cached prefix from either
        tier, or a fresh state. At least one token is always left to feed."""
        cache, reused, tier = self._reuse(tokens)
        self.last_reused = reused
        if count:
            self._count(tier, reused, len(tokens) - reused)
        if not self.trimmable and request is not None and (self.memory or self.disk):
            reused = self._checkpoint(cache, tokens, reused, request)
        return cache, tokens[reused:]

    def _reuse(self, tokens: list[int]) -> tuple[list[Any], int, str | None]:
        if len(tokens) > MIN_REUSE:
            mem = self.memory.best(tokens, self.trimmable) if self.memory else None
            mem_reuse = mem.reuse if mem else 0
            while self.disk is not None:  # a bad file is dropped, then the next best is tried
                self.disk.refresh()
                found = best_match(self.disk.trie, self.fingerprint, tokens, self.trimmable)
                if found is None or found.reuse <= max(mem_reuse, MIN_REUSE - 1):
                    break
                if (cache := self.disk.load(found.key)) is not None:
                    trim_prompt_cache(cache, len(found.key) - found.reuse)
                    return cache, found.reuse, "disk"
            if mem is not None and mem_reuse >= MIN_REUSE:
                return self._from_memory(mem), mem_reuse, "memory"
        return make_prompt_cache(self.model), 0, None

    def _from_memory(self, match: Match) -> list[Any]:
        drop = len(match.key) - match.reuse
        if self.trimmable and drop <= 1:  # the prompt extends this state: take it, no copy
            cache = self.memory.take(match.key).prompt_cache
            trim_prompt_cache(cache, drop)
            return cache
        entry = self.memory.peek(match.key)
        if self.trimmable:  # diverges: share its first tokens, keep it for its own branch
            return prefix_view(entry.prompt_cache, match.reuse)
        if entry.cache_type == "assistant":  # an answer's state: its next turn takes it
            return self.memory.take(match.key).prompt_cache
        return copy.deepcopy(entry.prompt_cache)  # a boundary state stays for other prompts

    def _count(self, tier: str | None, reused: int, prefilled: int) -> None:
        hit = tier is not None
        counts = {
            "hits": int(hit), "misses": int(not hit), "tokens_reused": reused,
            "tokens_prefilled": prefilled, "memory_hits": int(tier == "memory"),
            "disk_hits": int(tier == "disk"),
        }
        self.totals.update(counts)
        self._unsaved.update(counts)

    # -- message boundaries (untrimmable caches) --------------------------------------------

    def _checkpoint(self, cache: list[Any], tokens: list[int], done: int, request: Any) -> int:
        """Prefill up to each message boundary past `done` and keep a copy of the state there."""
        for end, kind in message_boundaries(self.tokenizer, request, tokens):
            if done < end < len(tokens):
                self._prefill(cache, tokens[done:end])
                done = end
                self.store(tokens[:end], copy.deepcopy(cache), kind)
        return done

    def _prefill(self, cache: list[Any], tokens: list[int]) -> None:
        import mlx.core as mx

        for i in range(0, len(tokens), self.step):  # the same chunks as generate_step's
            self.model(mx.array(tokens[i : i + self.step])[None], cache=cache)
            mx.eval([c.state for c in cache])

    # -- keeping states --------------------------------------------------------------------

    def store(self, tokens: list[int], cache: list[Any], kind: str = "assistant") -> None:
        """Keep the state for these tokens (memory, and written through to disk). `tokens`
        may run past the state (a last sampled token never fed): the key is cut to match."""
        held = cache_length(cache)
        key = list(tokens[:held] if held is not None else tokens)
        if held is not None and held > len(key):
            if not self.trimmable:
                return
            trim_prompt_cache(cache, held - len(key))
        if len(key) > MIN_REUSE:
            if self.disk is not None and self.disk.save(key, cache, kind, state_nbytes(cache)):
                if self.trimmable:
                    self.disk.drop_prefixes(key)
            if self.memory is not None:
                self.memory.insert_cache(self.fingerprint, key, cache, cache_type=kind)
        self._save_counts()

    def warm(self, tokens: list[int], request: Any = None) -> int:
        """Prefill a whole prompt into the cache without generating; returns tokens cached."""
        cache, todo = self.fetch(tokens, request, count=False)
        self._prefill(cache, todo)
        self.store(tokens, cache, "system")
        return len(tokens)

    def _save_counts(self) -> None:
        if self.disk is not None and self._unsaved:
            self.disk.index.add_counts(dict(self._unsaved))
        self._unsaved.clear()

    # -- reporting and housekeeping ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Plain numbers, safe to read from any thread (no MLX, no I/O)."""
        disk, memory = self.disk, self.memory
        figures = summarize(
            dict(self.totals), disk.nbytes if disk else 0, disk.entries if disk else 0
        )
        return {
            **figures,
            "memory_bytes": memory.nbytes if memory else 0,
            "memory_entries": len(memory) if memory else 0,
            "memory_limit": self.memory_limit,
            "disk_limit": self.disk_limit,
            "directory": str(self.directory),
            "trimmable": self.trimmable,
        }

    def clear(self) -> None:
        if self.memory is not None:
            self.memory.trim_to(n_sequences=0)
        if self.disk is not None:
            self.disk.clear()
        self.totals.clear()
        self._unsaved.clear()

    def close(self) -> None:
        self._save_counts()
        if self.disk is not None:
            self.disk.close()


def message_boundaries(tokenizer: Any, request: Any, tokens: list[int]) -> list[tuple[int, str]]:
    """Token positions where the system prompt and the whole conversation (before the answer's
    header) end, when the chat template renders them as prefixes of `tokens`."""
    from mlxc.engine.tools import template_messages  # as the engine renders them

    messages = template_messages(request.messages or [])
    cuts = [(1, "system")] if messages and messages[0]["role"] == "system" else []
    cuts.append((len(messages), "user"))
    found = []
    for k, kind in cuts:
        try:
            text = tokenizer.apply_chat_template(
                messages[:k], tools=request.tools, add_generation_prompt=False, tokenize=False
            )
            ids = tokenizer.encode(text, add_special_tokens=False)
        except Exception:  # some templates refuse a partial conversation: no boundary then
            continue
        if 0 < len(ids) < len(tokens) and tokens[: len(ids)] == ids:
            found.append((len(ids), kind))
    return sorted(set(found))

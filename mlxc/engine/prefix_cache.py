"""The prefix (KV) cache: token prefix -> the model's KV state after it, in memory and on disk,
so a follow-up turn or a shared system prompt prefills only the tokens it has not seen.

Engine thread only, except `stats()`, which reads plain Python numbers from any thread.

- Memory tier (prefix_memory.py): mlx-lm's trie + LRU with a byte budget, without its deep
  copy on every hit: a state the prompt extends is taken over, a diverging one is shared.
- Disk tier (prefix_disk.py): every stored state is written through, so it survives restarts.
- Caches that cannot be trimmed (sliding window, recurrent): states are also kept at message
  boundaries (end of the system prompt, end of the conversation before the answer).
"""

from __future__ import annotations

import copy
import logging
import os
import sqlite3
from collections import Counter
from typing import Any

from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from mlxc.config import Settings
from mlxc.engine.prefix_disk import DiskTier, state_nbytes
from mlxc.engine.prefix_index import COUNTERS, read_stats, summarize
from mlxc.engine.prefix_memory import (
    ALWAYS_TRIMMABLE,
    Match,
    MemoryTier,
    best_match,
    cache_length,
    prefix_view,
)
from mlxc.engine.turns import message_boundaries

log = logging.getLogger("mlxc.prefix")
DISK_ERRORS = (OSError, sqlite3.Error)  # a full or broken disk costs reuse, never an answer
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

    @property
    def keeps_states(self) -> bool:
        # Not `self.memory or self.disk`: an empty memory tier has len() 0, so it is falsy.
        return self.memory is not None or self.disk is not None

    # -- lookup ------------------------------------------------------------------------------

    def fetch(self, tokens: list[int], request: Any = None, count: bool = True):
        """(state to extend, tokens still to prefill): the longest cached prefix from either
        tier, or a fresh state. At least one token is always left to feed."""
        cache, reused, tier = self._reuse(tokens)
        self.last_reused = reused
        if count:
            self._count(tier, reused, len(tokens) - reused)
        if not self.trimmable and request is not None and self.keeps_states:
            reused = self._checkpoint(cache, tokens, reused, request)
        return cache, tokens[reused:]

    def _reuse(self, tokens: list[int]) -> tuple[list[Any], int, str | None]:
        if len(tokens) > MIN_REUSE:
            mem = self.memory.best(tokens, self.trimmable) if self.memory else None
            mem_reuse = mem.reuse if mem else 0
            while self.disk is not None:  # a bad file is dropped, then the next best is tried
                try:
                    self.disk.refresh()
                    found = best_match(self.disk.trie, self.fingerprint, tokens, self.trimmable)
                    if found is None or found.reuse <= max(mem_reuse, MIN_REUSE - 1):
                        break
                    cache = self.disk.load(found.key)
                except DISK_ERRORS as exc:
                    log.warning("prefix cache: disk tier unreadable (%s)", exc)
                    break
                if cache is not None:
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

        from mlxc.engine.generate import prefill_states

        prefill_states(self.model, mx.array(tokens), cache, self.step)

    # -- keeping states --------------------------------------------------------------------

    def store(
        self, tokens: list[int], cache: list[Any], kind: str = "assistant"
    ) -> list[int] | None:
        """Keep the state for these tokens (memory, and written through to disk). `tokens`
        may run past the state (a last sampled token never fed): the key is cut to match.
        Returns the key kept, if any."""
        held = cache_length(cache)
        key = list(tokens[:held] if held is not None else tokens)
        if held is not None and held > len(key):
            if not self.trimmable:
                return None
            trim_prompt_cache(cache, held - len(key))
        if len(key) <= MIN_REUSE:
            return None
        if self.memory is not None:
            self.memory.insert_cache(self.fingerprint, key, cache, cache_type=kind)
        try:
            if self.disk is not None and self.disk.save(key, cache, kind, state_nbytes(cache)):
                if self.trimmable:
                    self.disk.drop_prefixes(key)
            self._save_counts()
        except DISK_ERRORS as exc:
            log.warning("prefix cache: cannot write the disk tier (%s)", exc)
        return key

    def extend(self, key: list[int], more: list[int], cache: list[Any]) -> bool:
        """Feed `more` tokens to `cache`, the state just stored for `key`, and store it again as
        key + more. On disk the new file replaces the old one only once it is complete, so a
        kill meanwhile loses nothing. False if there is nothing to do or it cannot be undone
        (an untrimmable cache could not drop the tokens if the guess is wrong)."""
        if not (more and self.trimmable and self.keeps_states):
            return False
        if self.memory is not None:
            try:
                self.memory.take(key)  # it becomes the longer entry
            except KeyError:  # evicted meanwhile: the state is still good
                pass
        self._prefill(cache, more)
        self.store([*key, *more], cache)
        return True

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
        self.totals = Counter(dict.fromkeys(COUNTERS, 0))
        self._unsaved.clear()

    def close(self) -> None:
        try:
            self._save_counts()
        except DISK_ERRORS:
            pass  # counters only
        if self.disk is not None:
            self.disk.close()


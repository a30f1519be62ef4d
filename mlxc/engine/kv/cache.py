"""The prefix (KV) cache: token prefix -> the model's KV state after it, in memory and on disk,
so a follow-up turn or a shared system prompt prefills only the tokens it has not seen.

Engine thread only, except `stats()`, which reads plain Python numbers from any thread.

- Trimmable caches (full attention: KVCache, QuantizedKVCache): fixed token blocks named by a
  hash chain, the same blocks in memory and on disk, written by a writer thread
  (kv/block_cache.py). A turn writes only its new tokens; prefixes are shared.
- Caches that cannot be trimmed (sliding window, recurrent): whole states, also kept at
  message boundaries (end of the system prompt, end of the conversation before the answer)
  (kv/states.py).
"""

from __future__ import annotations

import copy
import logging
import os
from collections import Counter
from typing import Any

from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from mlxc.config import Settings
from mlxc.disk_full import DISK_ERRORS
from mlxc.engine.kv.blocks import token_array
from mlxc.engine.kv.divergence import PrefixReport, explain
from mlxc.engine.kv.index import COUNTERS, read_stats, summarize
from mlxc.engine.kv.memory import ALWAYS_TRIMMABLE, cache_length
from mlxc.engine.kv.turns import message_boundaries

log = logging.getLogger("mlxc.prefix")
DISK_COUNTERS = ("bytes_written", "writes_skipped", "blocks_damaged")  # kv/block_disk.py's
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
        self.disk_limit = settings.prefix_disk_bytes if fingerprint else 0
        self.directory = settings.prefix_dir
        self.tiers: Any = None
        if self.memory_limit > 0 or self.disk_limit > 0:
            args = (model, self.fingerprint, self.classes, self.directory, self.memory_limit,
                    self.disk_limit)
            if self.trimmable:
                from mlxc.engine.kv.block_cache import BlockTiers

                self.tiers = BlockTiers(*args, block_size=settings.prefix_block_tokens,
                                        min_reuse=MIN_REUSE,
                                        disk_bits=settings.prefix_disk_bits)
            else:
                from mlxc.engine.kv.states import WholeStates

                self.tiers = WholeStates(*args, min_reuse=MIN_REUSE)
        self.totals = Counter(self._persisted_totals())
        self._unsaved: Counter = Counter()
        self._disk_seen: Counter = Counter()  # the disk tier's own counts, already added
        self.last_reused = 0  # prompt tokens the last fetch took from a tier (not prefilled)
        self.last_report: PrefixReport | None = None  # why the last counted fetch reused that

    def _persisted_totals(self) -> dict[str, int]:
        """The counters earlier runs left; zeros when the disk refuses to open the index (a
        full disk: the index and its states stay as they are, this run counts from zero)."""
        try:
            stats = read_stats(self.directory)
        except DISK_ERRORS as exc:
            log.warning("prefix cache: earlier counts unreadable, counting from zero (%s)", exc)
            return dict.fromkeys(COUNTERS, 0)
        return {name: stats[name] for name in COUNTERS}

    @property
    def keeps_states(self) -> bool:
        return self.tiers is not None

    # -- lookup ------------------------------------------------------------------------------

    def fetch(self, tokens: list[int], request: Any = None, count: bool = True):
        """(state to extend, tokens still to prefill): the longest cached prefix from either
        tier, or a fresh state. At least one token is always left to feed."""
        key = tokens
        if self.tiers is not None:
            if self.trimmable:  # blocks compare C arrays: made once, for lookup and explanation
                key = token_array(tokens)
            cache, reused, per_tier = self.tiers.reuse(key)
        else:
            cache, reused, per_tier = make_prompt_cache(self.model), 0, {}
        self.last_reused = reused
        if count:
            self._count(per_tier, reused, len(tokens) - reused)
            self.last_report = explain(self.tiers, key, reused, per_tier)
        if not self.trimmable and request is not None and self.keeps_states:
            reused = self._checkpoint(cache, tokens, reused, request)
        return cache, tokens[reused:]

    def _count(self, per_tier: dict[str, int], reused: int, prefilled: int) -> None:
        hit = reused > 0
        tier = "disk" if per_tier.get("disk") else "memory"
        counts = {
            "hits": int(hit), "misses": int(not hit), "tokens_reused": reused,
            "tokens_prefilled": prefilled, "memory_hits": int(hit and tier == "memory"),
            "disk_hits": int(hit and tier == "disk"),
            "memory_tokens_reused": per_tier.get("memory", 0),
            "disk_tokens_reused": per_tier.get("disk", 0),
        }
        self._add(counts)

    def _add(self, counts: dict[str, int]) -> None:
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

        from mlxc.engine.decode.generate import prefill_states

        prefill_states(self.model, mx.array(tokens), cache, self.step)

    # -- keeping states --------------------------------------------------------------------

    def store(
        self, tokens: list[int], cache: list[Any], kind: str = "assistant"
    ) -> list[int] | None:
        """Keep the state for these tokens (memory, and written through to disk). `tokens`
        may run past the state (a last sampled token never fed): the key is cut to match.
        Blocks: only the new tokens' arrays are copied here; `cache` stays the caller's.
        Returns the key kept, if any."""
        held = cache_length(cache)
        key = list(tokens[:held] if held is not None else tokens)
        if held is not None and held > len(key):
            if not self.trimmable:
                return None
            trim_prompt_cache(cache, held - len(key))
        if len(key) <= MIN_REUSE or self.tiers is None:
            return None
        if self.trimmable:
            self.tiers.keep(key, cache)
        else:
            self._add({"bytes_written": self.tiers.keep(key, cache, kind)})
        self._save_counts()
        return key

    def extend(self, key: list[int], more: list[int], cache: list[Any]) -> bool:
        """Feed `more` tokens to `cache`, the state just stored for `key`, and store it again as
        key + more (blocks: only the new tail is written). False if there is nothing to do or it
        cannot be undone (an untrimmable cache could not drop the tokens if the guess is wrong)."""
        if not (more and self.trimmable and self.keeps_states):
            return False
        self._prefill(cache, more)
        self.store([*key, *more], cache)
        return True

    def warm(self, tokens: list[int], request: Any = None) -> int:
        """Prefill a whole prompt into the cache without generating; returns tokens cached."""
        cache, todo = self.fetch(tokens, request, count=False)
        self._prefill(cache, todo)
        self.store(tokens, cache, "system")
        return len(tokens)

    def _disk_counts(self) -> dict[str, int]:
        """What the blocks' disk tier counted itself (its writer's bytes and skipped writes,
        damaged files) since the last save."""
        disk = getattr(self.tiers, "disk", None) if self.trimmable else None
        if disk is None:
            return {}
        return {name: getattr(disk, name) - self._disk_seen[name] for name in DISK_COUNTERS}

    def _save_counts(self) -> None:
        new = self._disk_counts()
        self._add(new)
        self._disk_seen.update(new)
        counts = {k: v for k, v in self._unsaved.items() if v}
        if counts and self.tiers is not None and self.tiers.add_counts(counts):
            self._unsaved.clear()

    def flush(self) -> None:
        """Wait until queued disk writes are done (tests and benchmarks; never in the request
        path). Safe from any thread."""
        if self.tiers is not None:
            self.tiers.flush()

    # -- giving memory back ----------------------------------------------------------------------

    def memory_bytes(self) -> int:
        """Bytes the memory tier holds now."""
        tree = getattr(self.tiers, "tree", None)  # blocks
        memory = getattr(self.tiers, "memory", None)  # whole states: mlx-lm's LRU
        if tree is not None:
            return tree.memory_bytes
        return memory.nbytes if memory is not None else 0

    def shed(self, nbytes: int) -> int:
        """Drop at least `nbytes` (or all) from the memory tier, least recently used first
        (what is on disk stays there), to make room for a request's KV cache (batch/admission.py).
        Returns the bytes dropped."""
        tree = getattr(self.tiers, "tree", None)
        if tree is not None:
            return tree.shed(nbytes)
        memory = getattr(self.tiers, "memory", None)
        if memory is None:
            return 0
        before = memory.nbytes
        memory.trim_to(n_bytes=before - nbytes)
        return before - memory.nbytes

    # -- reporting and housekeeping ------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        """Plain numbers, safe to read from any thread (no MLX, no I/O)."""
        tiers = self.tiers
        disk = getattr(tiers, "disk", None)
        if disk is not None and self.trimmable:
            disk_bytes, disk_entries = disk.nbytes, disk.nblocks
        elif disk is not None:
            disk_bytes, disk_entries = disk.nbytes, disk.entries
        else:
            disk_bytes = disk_entries = 0
        totals = self.totals + Counter(self._disk_counts())  # with those not yet counted
        totals = {name: totals[name] for name in COUNTERS}
        return {
            **summarize(totals, disk_bytes, disk_entries, getattr(disk, "index_bytes", 0)),
            "memory_bytes": 0,
            "memory_entries": 0,
            "disk_blocks": 0,
            "shared_blocks": 0,
            **(tiers.figures() if tiers is not None else {}),
            "memory_limit": self.memory_limit,
            "disk_limit": self.disk_limit,
            "directory": str(self.directory),
            "trimmable": self.trimmable,
        }

    def close(self) -> None:
        if self.tiers is not None:
            self.tiers.flush()
            self._save_counts()
            self.tiers.close()

"""Whole states, for models whose caches cannot be cut into blocks (sliding windows,
recurrent layers): kept at message boundaries and after answers, in memory (mlx-lm's trie + LRU,
kv/memory.py) and written through to disk (kv/state_disk.py). Engine thread only.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from mlx_lm.models.cache import make_prompt_cache

from mlxc.disk_full import DISK_ERRORS
from mlxc.engine.kv.memory import MemoryTier, best_match
from mlxc.engine.kv.state_disk import DiskTier, state_nbytes

log = logging.getLogger("mlxc.prefix")


class WholeStates:
    """Memory and disk tiers of whole states for one untrimmable model."""

    def __init__(self, model: Any, fingerprint: str, classes: list[str], directory: Path,
                 memory_limit: int, disk_limit: int, min_reuse: int = 8) -> None:
        self.model, self.fingerprint, self.min_reuse = model, fingerprint, min_reuse
        self.memory = MemoryTier(memory_limit, fingerprint) if memory_limit > 0 else None
        self.disk = None
        if disk_limit:
            try:
                self.disk = DiskTier(directory, fingerprint, disk_limit, classes)
            except DISK_ERRORS as exc:
                log.warning("prefix cache: disk tier unusable, memory only (%s)", exc)

    def reuse(self, tokens: list[int]) -> tuple[list[Any], int, dict[str, int]]:
        """(state, tokens reused, tokens per tier): the longest exact prefix kept in a tier."""
        if len(tokens) > self.min_reuse:
            mem = self.memory.best(tokens, False) if self.memory is not None else None
            mem_reuse = mem.reuse if mem else 0
            while self.disk is not None:  # a bad file is dropped, then the next best is tried
                try:
                    self.disk.refresh()
                    found = best_match(self.disk.trie, self.fingerprint, tokens, False)
                    if found is None or found.reuse <= max(mem_reuse, self.min_reuse - 1):
                        break
                    cache = self.disk.load(found.key)
                except DISK_ERRORS as exc:
                    log.warning("prefix cache: disk tier unreadable (%s)", exc)
                    break
                if cache is not None:
                    return cache, found.reuse, {"disk": found.reuse}
            if mem is not None and mem_reuse >= self.min_reuse:
                entry = self.memory.peek(mem.key)
                if entry.cache_type == "assistant":  # an answer's state: its next turn takes it
                    cache = self.memory.take(mem.key).prompt_cache
                else:  # a boundary state stays for other prompts
                    cache = copy.deepcopy(entry.prompt_cache)
                return cache, mem_reuse, {"memory": mem_reuse}
        return make_prompt_cache(self.model), 0, {}

    def keep(self, key: list[int], cache: list[Any], kind: str) -> int:
        """Keep the state in memory and write it through to disk; returns bytes written."""
        if self.memory is not None:
            self.memory.insert_cache(self.fingerprint, key, cache, cache_type=kind)
        written = 0
        try:
            nbytes = state_nbytes(cache)
            if self.disk is not None and self.disk.save(key, cache, kind, nbytes):
                written = nbytes
        except DISK_ERRORS as exc:
            log.warning("prefix cache: cannot write the disk tier (%s)", exc)
        return written

    def figures(self) -> dict[str, Any]:
        memory = self.memory
        return {
            "memory_bytes": memory.nbytes if memory is not None else 0,
            "memory_entries": len(memory) if memory is not None else 0,
        }

    def add_counts(self, counts: dict[str, int]) -> bool:
        if self.disk is None:
            return False
        try:
            self.disk.index.add_counts(counts)
        except DISK_ERRORS:
            return False
        return True

    def flush(self) -> None:
        pass  # written in the request path

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

"""The prefix cache's disk tier: KV states as safetensors files (mlx-lm's `save_prompt_cache`)
under the cache folder, found by longest token prefix after a restart.

Engine thread only (it runs MLX). Each state is written through when it is made: temporary
file, then an atomic rename, then its index row, so a kill -9 loses at most the state being
written. A file that is corrupt, partial or not what its row says is removed with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

from mlx_lm.models.cache import PromptTrie, load_prompt_cache, save_prompt_cache

from mlxc.engine.kv.block_file import open_regular
from mlxc.engine.kv.index import IndexRow, PrefixIndex

log = logging.getLogger("mlxc.prefix")
FORMAT = "mlxc-prefix-1"


def entry_id(fingerprint: str, tokens: list[int]) -> str:
    digest = hashlib.sha256(fingerprint.encode() + b"\0")
    digest.update(json.dumps(tokens, separators=(",", ":")).encode())
    return digest.hexdigest()[:40]


def state_nbytes(cache: list[Any]) -> int:
    """Bytes a state takes in a file (only the filled part of each buffer is saved)."""
    total = 0
    for layer in cache:
        for array in _leaves(layer.state):
            total += array.nbytes
    return total


def _leaves(tree: Any):
    if isinstance(tree, (list, tuple)):
        for item in tree:
            yield from _leaves(item)
    elif hasattr(tree, "nbytes"):
        yield tree


def read_header(path: Path) -> dict[str, str]:
    """A safetensors file's metadata, read without MLX or loading the arrays."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > 1 << 26 or size > path.stat().st_size:
            raise ValueError("bad header length")
        header = json.loads(f.read(size))
    return header.get("__metadata__", {})


class DiskTier:
    """States of one model on disk; a trie of their tokens answers longest-prefix lookups."""

    def __init__(self, directory: Path, fingerprint: str, budget: int, classes: list[str]) -> None:
        self.fingerprint = fingerprint
        self.budget = budget
        self.classes = classes  # the model's cache kinds, in layer order
        self.index = PrefixIndex(directory)
        self.index.sweep()
        self.trie = PromptTrie()
        self._rows: dict[str, IndexRow] = {}  # by id
        self._seq = 0
        self.nbytes = self.index_bytes = 0
        self.entries = 0
        self.refresh()

    def refresh(self) -> None:
        """Pick up states written since the last look, by this or another process."""
        rows = self.index.rows_since(self.fingerprint, self._seq)
        for row in rows:
            self._seq = max(self._seq, row.seq)
            self._rows[row.id] = row
            self.trie.add(self.fingerprint, row.tokens, row.id)
        if rows or not self._seq:
            self._update_totals()

    def _update_totals(self) -> None:
        self.index_bytes = self.index.index_bytes()  # in the budget, and in `nbytes`
        self.nbytes = self.index.rows_bytes() + self.index_bytes
        self.entries = self.index.count()

    def _forget(self, key: list[int]) -> None:
        try:
            row_id = self.trie.pop(self.fingerprint, key)
        except KeyError:
            return
        self._rows.pop(row_id, None)

    def load(self, key: list[int]) -> list[Any] | None:
        """The state saved for exactly these tokens, or None (gone, or bad and now removed)."""
        import mlx.core as mx

        row_id = entry_id(self.fingerprint, key)
        path = self.index.path_of(row_id)
        if not path.exists():  # evicted or cleared by another process: not an error
            self._forget(key)
            self.index.remove(row_id)
            return None
        try:
            os.close(open_regular(path))  # never a FIFO (open() would wait), symlink or folder
            meta = read_header(path)
            self._check_metadata(meta, key)
            cache = load_prompt_cache(str(path))
            mx.eval([c.state for c in cache])
            for layer in cache:
                if hasattr(layer, "offset") and layer.offset != len(key):
                    raise ValueError(f"holds {layer.offset} tokens, the index says {len(key)}")
        except Exception as exc:  # any unreadable file is skipped, never a crash
            if path.exists() or path.is_symlink():
                log.warning("prefix cache: removing unusable state file %s (%s)", path.name, exc)
            self._forget(key)
            self.index.remove(row_id)
            self._update_totals()
            return None
        self.index.touch(row_id)
        return cache

    def _check_metadata(self, meta: dict[str, str], key: list[int]) -> None:
        if meta.get("0.format") != FORMAT:
            raise ValueError("not an mlxc prefix state")
        if meta.get("0.fingerprint") != self.fingerprint:
            raise ValueError("made by another model")
        if meta.get("0.id") != entry_id(self.fingerprint, key):
            raise ValueError("its tokens differ from the index")
        classes = [meta.get(f"1.{i}") for i in range(len(self.classes))]
        if classes != self.classes or f"1.{len(self.classes)}" in meta:
            raise ValueError("cache layout differs from the model's")

    def save(self, key: list[int], cache: list[Any], kind: str, nbytes: int) -> bool:
        """Write a state through to disk unless it is there already or over the budget."""
        row_id = entry_id(self.fingerprint, key)
        if nbytes > self.budget:
            return False
        if self.index.has(row_id) and self.index.path_of(row_id).exists():
            self.index.touch(row_id)
            self.trie.add(self.fingerprint, list(key), row_id)
            return True
        final = self.index.path_of(row_id)
        temp = final.with_name(f".tmp-{os.getpid()}-{row_id}.safetensors")
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "id": row_id}
        try:
            save_prompt_cache(str(temp), cache, meta)
            os.chmod(temp, 0o600)  # MLX creates it 0666 less the umask: all of it under 000
            os.replace(temp, final)
        except (OSError, RuntimeError, ValueError) as exc:  # MLX reports a full disk its own way
            temp.unlink(missing_ok=True)
            log.warning("prefix cache: cannot write %s (%s)", final, exc)
            return False
        seq = self.index.put(row_id, self.fingerprint, key, nbytes, kind)
        if seq == self._seq + 1:  # else another process wrote in between: refresh reads both
            self._seq = seq
        self._rows[row_id] = IndexRow(row_id, seq, list(key), nbytes, kind)
        self.trie.add(self.fingerprint, list(key), row_id)
        for gone in self.index.evict_to(self.budget):
            row = self._rows.get(gone)
            if row is not None:
                self._forget(row.tokens)
        self._update_totals()
        return True

    def clear(self) -> None:
        self.index.clear()
        self.trie = PromptTrie()
        self._rows.clear()
        self._update_totals()

    def close(self) -> None:
        self.index.close()

"""The prefix cache for trimmable models, in blocks: memory and disk hold the same blocks,
named by a hash chain (kv/blocks.py), so a turn writes only its new tokens and one system
prompt is stored once for every conversation that starts with it.

Engine thread only, except `figures()`. The engine's cost per stored state: slicing and
evaluating its new tokens (a copy out of the step-sized buffers; with `prefix_disk_bits` 8
also their 8-bit copies for the disk); the files are written by the
disk tier's writer thread.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlxc.engine.kv.block_disk import DISK_ERRORS, BlockDisk
from mlxc.engine.kv.block_kv import (
    assemble,
    blank,
    byte_view,
    cut,
    from_file,
    kv_dtype,
    layer_width,
    nbytes,
    quantize,
    split,
    to_buffers,
)
from mlxc.engine.kv.blocks import Block, BlockTree, chain_hash, root_hash, token_array

log = logging.getLogger("mlxc.prefix")
BLOCK_SIZE = 256
# fsync before the rename: a power cut leaves a block whole or absent too. Measured on the
# writer thread here: ~+13 ms on ~90 ms for a 28 MiB block (a 3B model's 256 tokens): kept.
# The open (partial) block is rewritten as one longer block when its tokens are at most this
# share of the new ones: few, larger files, while a turn still writes <= 1.5x its new tokens.
REWRITE_SHARE = 0.5


class BlockTiers:
    """Memory and disk tiers of blocks for one model."""

    def __init__(self, model: Any, fingerprint: str, classes: list[str], directory: Path,
                 memory_limit: int, disk_limit: int, block_size: int = BLOCK_SIZE,
                 fsync: bool = True, min_reuse: int = 8, disk_bits: int = 0) -> None:
        self.model = model
        self.block_size = block_size
        self.min_reuse = min_reuse
        widths = [layer_width(layer) for layer in make_prompt_cache(model)]
        self.width = sum(widths)
        # 8-bit on disk: plain K/V only (a QuantizedKVCache's are quantized already). Such
        # blocks have their own chain root, so a process with the setting off never reuses
        # approximated KV (nor this one the other's full blocks: one prefill after a switch).
        self.disk_bits = disk_bits if all(w == 2 for w in widths) else 0
        layout = kv_dtype(model) + (f"/disk-q{self.disk_bits}" if self.disk_bits else "")
        self.root = root_hash(fingerprint, layout, classes)
        self.tree = BlockTree(self.root, memory_limit)
        self.disk = None
        if disk_limit > 0:
            try:
                self.disk = BlockDisk(directory, self.root, disk_limit, self.tree, fsync)
            except DISK_ERRORS as exc:
                log.warning("prefix cache: disk tier unusable, memory only (%s)", exc)
        self.last_turn_bytes = 0  # KV bytes the last stored state added (to write)
        self.turns = 0
        self.turn_bytes = 0

    # -- lookup ----------------------------------------------------------------------------

    def reuse(self, tokens: list[int]) -> tuple[list[Any], int, dict[str, int]]:
        """(cache, tokens reused, tokens reused per tier) for the longest stored prefix of
        `tokens`, leaving at least one token to feed."""
        if self.disk is not None:
            try:
                self.disk.refresh()
            except DISK_ERRORS as exc:
                log.warning("prefix cache: disk tier unreadable (%s)", exc)
        limit = len(tokens) - 1
        # The blocks to reuse, the tokens of each, and their arrays if memory holds them (taken
        # now: loading the others may evict them from the memory tier).
        chain: list[tuple[Block, int, Any]] = []
        n = 0
        for block, found in self.tree.walk(tokens) if limit >= self.min_reuse else ():
            k = min(found, limit - n)
            if k <= 0:
                break
            chain.append((block, k, block.arrays))
            n += k
            if k < found:  # cut short to leave a token to feed
                break
        loaded = self._load([b for b, _, arrays in chain if arrays is None])
        pieces, lengths, used, n = [], [], [], 0
        per_tier = {"memory": 0, "disk": 0}
        for block, k, arrays in chain:
            tier = "memory"
            if arrays is None:
                arrays, tier = loaded.get(block.hash), "disk"
                if arrays is None:  # gone or unusable: the chain ends before it
                    break
            pieces.append(arrays)
            lengths.append(k)
            used.append(block)
            per_tier[tier] += k
            n += k
        if n < self.min_reuse:
            return make_prompt_cache(self.model), 0, {}
        self.tree.touch(used)
        if self.disk is not None:
            self.disk.touch(used)
        return assemble(make_prompt_cache(self.model), pieces, lengths), n, per_tier

    def _load(self, blocks: list[Block]) -> dict[str, list[Any]]:
        """The arrays of blocks the memory tier lacks, from their files, read straight into
        MLX memory several at once (then held in memory), up to the first that fails."""
        if self.disk is None:
            return {}
        opened = []
        for block in blocks:
            found = self.disk.open(block) if block.on_disk else None
            if found is None:
                break
            size = sum(int(spec["nbytes"]) for spec in found.header.arrays)
            opened.append((block, found, blank(size)))
        read = self.disk.read([(b, o, [byte_view(into)]) for b, o, into in opened])
        out: dict[str, list[Any]] = {}
        for (block, found, into), whole in zip(opened, read, strict=True):
            specs = found.header.arrays
            if not whole or (arrays := self._arrays(block, specs, split(into, specs))) is None:
                break
            out[block.hash] = arrays
        return out

    def _arrays(self, block: Block, specs: list[dict], raw: list[Any]) -> list[Any] | None:
        """A block's arrays from its file's (8-bit ones dequantized), held in memory; None
        (and the file removed) if they do not fit this model's layout."""
        try:
            out = from_file(specs, raw)
            why = "layout differs"
        except ValueError as exc:
            out, why = [], str(exc)
        shapes_ok = len(out) == self.width and all(
            a.ndim == 4 and a.shape[2] == len(block.tokens) for a in out
        )
        if not shapes_ok:
            log.warning("prefix cache: removing unusable block file %s (%s)", block.hash, why)
            self.tree.forget_disk(block.hash)
            self.disk.drop([block.hash])
            return None
        mx.eval(out)
        self.tree.hold(block, out, nbytes(out))
        return out

    # -- keeping ---------------------------------------------------------------------------

    def keep(self, key: list[int], cache: list[Any]) -> int:
        """Store the blocks of `key` (the tokens `cache` holds) that are not stored yet;
        returns the KV bytes added."""
        n = len(key)
        path = self.tree.walk(key, available=False)  # pending blocks count: they are coming
        pos = sum(k for _, k in path)
        if pos >= n:
            return 0  # every token is in a stored block already
        parent = self.root
        if path:  # continue from the last block, or from its head if the key diverges in it
            last, k = path[-1]
            parent = last.hash if k == len(last.tokens) else f"{last.hash}@{k}"
        boundary = pos - pos % self.block_size
        superseded: list[Block] = []
        opened = [(b, k) for b, k in path if b.start >= boundary]
        if (pos % self.block_size and (pos - boundary) <= REWRITE_SHARE * (n - pos)
                and opened and opened[0][0].start == boundary  # (blocks of another size: no)
                and all(k == len(b.tokens) for b, k in opened)):
            superseded = [b for b, _ in opened]  # this sequence's own open block: rewritten
            pos, parent = boundary, superseded[0].parent
        runs = []
        while pos < n:
            end = min(n, (pos // self.block_size + 1) * self.block_size)
            runs.append((pos, end))
            pos = end
        pieces = [cut(cache, a, b) for a, b in runs]
        # 8-bit copies for the disk, made here (the writer never calls MLX); memory keeps
        # the full-precision pieces.
        bits = self.disk_bits if self.disk is not None else 0
        packed = [quantize(arrays, bits) for arrays in pieces]
        mx.eval(pieces, [p for p, _ in packed])
        added = 0
        for i, ((a, b), arrays) in enumerate(zip(runs, pieces, strict=True)):
            tokens = token_array(key[a:b])
            block = self.tree.add(Block(chain_hash(parent, tokens), parent, a, tokens))
            parent = block.hash
            size = nbytes(arrays)
            if block.arrays is None:
                self.tree.hold(block, arrays, size)
            if block.on_disk or block.pending:
                continue
            on_disk, notes = packed[i]
            added += nbytes(on_disk)  # what goes to disk: 8-bit when that is on
            if self.disk is not None:
                specs, views = to_buffers(on_disk, notes)
                held = not bits and block.arrays is arrays  # then the queue costs no memory
                self.disk.write(block, on_disk, specs, views, held)
            elif block.arrays is None:  # no disk and no room in memory
                self.tree.remove(block.hash)
                break
        self._supersede(superseded)
        self.last_turn_bytes = added
        self.turns += 1
        self.turn_bytes += added
        return added

    def _supersede(self, blocks: list[Block]) -> None:
        """Drop the old pieces of a block just rewritten whole, unless another sequence
        continues from them."""
        gone = []
        for block in reversed(blocks):
            if self.tree.has_children(block.hash):
                break
            self.tree.remove(block.hash)
            gone.append(block.hash)
        if gone and self.disk is not None:
            self.disk.drop(gone)

    # -- reporting -------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        counts = self.tree.counts()
        disk = self.disk
        return {
            "block_size": self.block_size,
            "memory_bytes": counts["memory_bytes"],
            "memory_entries": counts["memory_blocks"],
            "memory_blocks": counts["memory_blocks"],
            "shared_blocks": counts["shared_blocks"],
            "bytes_written_last_turn": self.last_turn_bytes,
            "bytes_per_turn": self.turn_bytes / self.turns if self.turns else 0.0,
            "disk_blocks": disk.nblocks if disk else 0,
        }

    def add_counts(self, counts: dict[str, int]) -> bool:
        """Counters to persist (through the writer, which owns the index's writes)."""
        return self.disk is not None and self.disk.add_counts(counts)

    def flush(self) -> None:
        if self.disk is not None:
            self.disk.flush()

    def close(self) -> None:
        if self.disk is not None:
            self.disk.close()

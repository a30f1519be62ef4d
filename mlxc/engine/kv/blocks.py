"""Blocks of a KV state, named by a hash chain, and the tree they form; the memory tier.

A block holds the KV of a run of tokens that starts where its parent ends. Its name is
sha256(parent's name, its token ids); the chain starts from a root named after the model
(fingerprint, KV dtype, cache layout), so a name says the model, every token before and the
block's own tokens: equal names mean equal KV, stored once, whoever made it.

Blocks are aligned on `block_size` positions (a run never crosses a multiple of it), so two
conversations with one system prompt share its blocks. A state's trailing partial block is kept
too; a later turn appends a further run after it, or rewrites it as a longer one when that costs
little (see kv/block_cache.py). A sequence that diverges inside a block continues from the
block's first k tokens: its next block's parent is named "<block>@k", so nothing is rewritten.

No MLX here: blocks carry their arrays as opaque objects. Thread-safe (one lock): the engine
walks and fills the tree, the disk writer marks what reached the disk.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any


def chain_hash(parent: str, tokens) -> str:
    digest = hashlib.sha256(parent.encode())
    digest.update(array("i", tokens).tobytes())
    return digest.hexdigest()[:40]


def root_hash(fingerprint: str, kv_dtype: str, layout: list[str]) -> str:
    """The chain's start for one model: its weights (fingerprint), KV dtype and cache kinds."""
    return hashlib.sha256(
        "\0".join(["mlxc-blocks-1", fingerprint, kv_dtype, *layout]).encode()
    ).hexdigest()[:40]


def token_array(tokens) -> array:
    """Token ids as a C array: compact, compared in C, and not tracked by the garbage collector
    (10,000 blocks of tuples made every collection walk millions of ints)."""
    return tokens if isinstance(tokens, array) else array("i", tokens)


@dataclass(eq=False, slots=True)
class Block:
    hash: str
    parent: str
    start: int
    tokens: array  # token_array
    arrays: Any = None  # the KV (per layer leaves) while the memory tier holds it
    nbytes: int = 0  # of the arrays
    on_disk: bool = False
    pending: bool = False  # queued for the disk writer
    shared: bool = False  # a prefix of more than one stored sequence
    children: dict[int, list[str]] = field(default_factory=dict)  # by first token
    # Blocks that continue from this block's first k tokens: k -> children by first token.
    heads: dict[int, dict[int, list[str]]] = field(default_factory=dict)

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)

    @property
    def available(self) -> bool:
        return self.arrays is not None or self.on_disk


class BlockTree:
    """Every block this process knows (in memory, on disk or on its way there), as a tree
    under the root, and the memory tier: an LRU of the blocks whose arrays it holds, kept
    within a byte budget."""

    def __init__(self, root: str, memory_limit: int) -> None:
        self.root = root
        self.memory_limit = memory_limit
        self.lock = threading.RLock()
        self.blocks: dict[str, Block] = {}
        self._roots: dict[int, list[str]] = {}  # children of the root, by first token
        self._lru: OrderedDict[str, None] = OrderedDict()
        self.memory_bytes = 0
        self.shared = 0

    def _children(self, parent: str, make: bool = False) -> dict[int, list[str]] | None:
        if parent == self.root:
            return self._roots
        base, _, head = parent.partition("@")
        block = self.blocks.get(base)
        if block is None:
            return None
        if not head:
            return block.children
        return block.heads.setdefault(int(head), {}) if make else block.heads.get(int(head))

    # -- finding -------------------------------------------------------------------------------

    def walk(self, tokens: list[int], available: bool = True) -> list[tuple[Block, int]]:
        """The longest chain of (available) blocks that `tokens` starts with, as (block, tokens
        of it used): a block used in part is followed by blocks that continue from its head,
        if any; else it is the last."""
        out: list[tuple[Block, int]] = []
        parent, pos = self.root, 0
        tokens = token_array(tokens)
        with self.lock:
            while pos < len(tokens):
                kids = self._children(parent)
                options = [self.blocks[h] for h in (kids or {}).get(tokens[pos], ())]
                best, best_len, whole = None, 0, False
                for block in options:
                    if available and not block.available:
                        continue
                    n = _common(block.tokens, tokens, pos)
                    full = n == len(block.tokens)
                    if (full, n) > (whole, best_len):
                        best, best_len, whole = block, n, full
                if best is None:
                    break
                out.append((best, best_len))
                parent, pos = best.hash if whole else f"{best.hash}@{best_len}", pos + best_len
                if not whole and not self._children(parent):
                    break
        return out

    # -- changing ------------------------------------------------------------------------------

    def add(self, block: Block) -> Block:
        """Insert a block (or return the one already known by that name)."""
        with self.lock:
            known = self.blocks.get(block.hash)
            if known is not None:
                return known
            kids = self._children(block.parent, make=True)
            if kids is None:
                raise KeyError("parent unknown")
            siblings = kids.setdefault(block.tokens[0], [])
            siblings.append(block.hash)
            self.blocks[block.hash] = block
            if "@" in block.parent or sum(map(len, kids.values())) > 1:  # a branch
                self._mark_shared(block.parent)
            return block

    def _mark_shared(self, h: str) -> None:
        h = h.partition("@")[0]  # a block's head is shared: the block is, as far as it goes
        while h != self.root:
            block = self.blocks.get(h)
            if block is None or block.shared:
                return
            block.shared = True
            self.shared += 1
            h = block.parent

    def remove(self, h: str) -> list[Block]:
        """Forget a block and everything after it (unreachable without it); returns them."""
        gone: list[Block] = []
        with self.lock:
            block = self.blocks.get(h)
            if block is None:
                return gone
            kids = self._children(block.parent)
            if kids is not None:
                siblings = kids.get(block.tokens[0], [])
                if h in siblings:
                    siblings.remove(h)
                if not siblings:
                    kids.pop(block.tokens[0], None)
                base, _, head = block.parent.partition("@")
                if head and not kids and base in self.blocks:
                    self.blocks[base].heads.pop(int(head), None)
            stack = [block]
            while stack:
                b = stack.pop()
                self.blocks.pop(b.hash, None)
                self._drop_memory(b)
                self.shared -= b.shared
                gone.append(b)
                groups = [b.children, *b.heads.values()]
                stack.extend(self.blocks[c] for kids in groups for hs in kids.values()
                             for c in hs if c in self.blocks)
        return gone

    def has_children(self, h: str) -> bool:
        with self.lock:
            block = self.blocks.get(h)
            return bool(block and (block.children or block.heads))

    # -- the memory tier -----------------------------------------------------------------------

    def hold(self, block: Block, arrays: Any, nbytes: int) -> None:
        """Keep a block's arrays in memory (most recently used), evicting to the budget."""
        with self.lock:
            if nbytes > self.memory_limit or block.hash not in self.blocks:
                return
            if block.arrays is None:
                block.arrays, block.nbytes = arrays, nbytes
                self.memory_bytes += nbytes
            self._lru[block.hash] = None
            self._lru.move_to_end(block.hash)
            self._evict()

    def touch(self, chain: list[Block]) -> None:
        """Mark a chain used, its first blocks last: they go after the blocks that need them."""
        with self.lock:
            for block in reversed(chain):
                if block.hash in self._lru:
                    self._lru.move_to_end(block.hash)

    def shed(self, nbytes: int) -> int:
        """Drop at least `nbytes` of arrays (or all), least recently used first; returns the
        bytes dropped (room for a request's KV cache: batch/admission.py)."""
        with self.lock:
            before, limit = self.memory_bytes, self.memory_limit
            self.memory_limit = max(before - nbytes, 0)
            try:
                self._evict()
            finally:
                self.memory_limit = limit
            return before - self.memory_bytes

    def _evict(self) -> None:
        while self.memory_bytes > self.memory_limit and self._lru:
            h, _ = self._lru.popitem(last=False)
            block = self.blocks.get(h)
            if block is None:
                continue
            self._drop_memory(block)
            if not block.on_disk and not block.pending:
                self.remove(h)

    def _drop_memory(self, block: Block) -> None:
        if block.arrays is not None:
            self.memory_bytes -= block.nbytes
            block.arrays = None
        self._lru.pop(block.hash, None)

    def forget_disk(self, h: str) -> None:
        """The disk lost a block (evicted, unreadable): without its arrays it is gone."""
        with self.lock:
            block = self.blocks.get(h)
            if block is None:
                return
            block.on_disk = False
            if block.arrays is None and not block.pending:
                self.remove(h)

    def counts(self) -> dict[str, int]:
        with self.lock:
            return {
                "memory_blocks": len(self._lru),
                "memory_bytes": self.memory_bytes,
                "known_blocks": len(self.blocks),
                "shared_blocks": self.shared,
            }


def _common(block_tokens: array, tokens: array, pos: int) -> int:
    n = min(len(block_tokens), len(tokens) - pos)
    if tokens[pos : pos + n] == block_tokens[:n]:
        return n
    i = 0
    while i < n and block_tokens[i] == tokens[pos + i]:
        i += 1
    return i

"""The blocks' disk tier: a writer thread that writes blocks through (the engine only hands it
evaluated arrays), and reads for the engine when a chain's blocks are not in memory.

The writer owns its SQLite connection and every write: reserve the row under the budget,
write a temporary file, rename it into place. Its queue is bounded: when it is full, a block
is not written (counted in `writes_skipped`) rather than holding up generation.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from mlxc.disk_full import DISK_ERRORS
from mlxc.engine.kv.block_file import (
    BadBlock,
    BlockHeader,
    OldBlock,
    OpenBlock,
    open_block,
    read_into,
    write_temp,
)
from mlxc.engine.kv.block_index import BlockIndex, BlockRow, _unlink
from mlxc.engine.kv.blocks import Block, BlockTree, chain_hash, token_array

log = logging.getLogger("mlxc.prefix")
QUEUE_BLOCKS = 256  # jobs waiting for the writer at most
QUEUE_BYTES = 1 << 30  # KV waiting for the disk at most (held in memory until written)
READERS = 8  # threads reading one lookup's blocks at once


class BlockDisk:
    """Blocks of one model (one chain root) on disk, shared with other processes."""

    def __init__(self, directory: Path, root: str, budget: int, tree: BlockTree,
                 fsync: bool = False, queue_blocks: int = QUEUE_BLOCKS,
                 queue_bytes: int = QUEUE_BYTES) -> None:
        self.root, self.budget, self.tree, self.fsync = root, budget, tree, fsync
        self.index = BlockIndex(directory)  # the engine thread's connection (reads)
        self.index.sweep_old_states()
        self.index.reconcile()
        self.directory = Path(directory)
        self._seq = 0
        self.bytes_written = 0  # by this process
        self.writes_skipped = 0
        self.blocks_damaged = 0  # files that failed their checks when read (engine thread)
        self._totals(self.index)
        self._jobs: queue.Queue = queue.Queue(queue_blocks)
        self.queue_bytes, self._queued = queue_bytes, 0  # bytes of blocks not yet written
        self._queued_lock = threading.Lock()
        self._writer = threading.Thread(target=self._run, name="mlxc-prefix-writer", daemon=True)
        self._writer.start()
        self._readers = ThreadPoolExecutor(READERS, thread_name_prefix="mlxc-prefix-reader")
        self.refresh()

    # -- engine thread -------------------------------------------------------------------------

    def refresh(self) -> None:
        """Learn blocks written since the last look, by this process or another."""
        rows = self.index.rows_since(self.root, self._seq)
        pending: dict[str, list[BlockRow]] = {}
        for row in rows:  # grouped by the block they continue (in full or from its head)
            if not row.writing:
                pending.setdefault(row.parent.partition("@")[0], []).append(row)
        # Next time, read again from the first block still being written.
        writing = [row.seq for row in rows if row.writing]
        if rows:
            self._seq = min(writing) - 1 if writing else rows[-1].seq
        # Parents first: a row arrives in any order relative to its parent's.
        frontier = [self.root, *(h for h in pending if h in self.tree.blocks)]
        while frontier:
            for row in pending.pop(frontier.pop(), []):
                tokens = token_array(row.tokens)
                block = self.tree.add(Block(row.hash, row.parent, row.start, tokens))
                block.on_disk = True
                frontier.append(row.hash)

    def write(self, block: Block, arrays: list[Any], specs: list[dict], views: list,
              held: bool = False) -> bool:
        """Queue a block for the writer; False (and counted) if the queue is full. `held`:
        the memory tier holds these very arrays."""
        header = BlockHeader(block.hash, block.parent, self.root, block.start,
                             block.tokens.tolist(), specs, any("quant" in s for s in specs))
        # A block the memory tier holds costs the queue no memory: its arrays are held anyway.
        # Only the others count against `queue_bytes` (an 8,000-token prompt of a 3B model in
        # float32 is ~1.9 GB of new blocks at once; counting those too skipped half of them).
        size = 0 if held else sum(v.nbytes for v in views)
        with self._queued_lock:
            room = self._queued + size <= self.queue_bytes
            if room:
                self._queued += size
        block.pending = True
        try:
            if not room:
                raise queue.Full
            self._jobs.put_nowait(("write", block, header, views, size, arrays))
        except queue.Full:
            if room:
                with self._queued_lock:
                    self._queued -= size
            block.pending = False
            self.writes_skipped += 1
            return False
        return True

    def touch(self, chain: list[Block]) -> None:
        try:
            self._jobs.put_nowait(("touch", [b.hash for b in chain if b.on_disk]))
        except queue.Full:
            pass  # recency only

    def drop(self, hashes: list[str]) -> None:
        try:
            self._jobs.put_nowait(("drop", hashes))
        except queue.Full:
            pass  # superseded blocks age out by LRU instead

    def add_counts(self, counts: dict[str, int]) -> bool:
        try:
            self._jobs.put_nowait(("counts", counts))
        except queue.Full:
            return False
        return True

    def open(self, block: Block) -> OpenBlock | None:
        """A block's file opened and its header checked against the block, or None when it
        is gone or unusable (then it is forgotten, with a warning if it was bad)."""
        path = self.index.block_path(block.hash)
        try:
            opened = open_block(path)
            header = opened.header
            if (header.hash, header.root, header.parent, token_array(header.tokens)) != (
                block.hash, self.root, block.parent, block.tokens
            ) or chain_hash(header.parent, header.tokens) != block.hash:
                opened.close()
                raise BadBlock("another block's or model's")
            return opened
        except FileNotFoundError:  # evicted by another process: not an error
            pass
        except (BadBlock, OSError) as exc:
            self._unusable(block, exc)
            return None
        self._forget(block)
        return None

    def read(self, jobs: list[tuple[Block, OpenBlock, list[memoryview]]]) -> list[bool]:
        """Read opened blocks' arrays into their buffers and check their checksums, several at
        once (reads and hashing release the GIL: a restart's 8,000-token prefix is 32 files);
        which ones were read whole and intact. The others are dropped and counted."""
        def one(job) -> Exception | None:
            _, opened, buffers = job
            try:
                read_into(opened, buffers)
            except (BadBlock, OSError) as exc:
                return exc
            return None

        failed = ([one(job) for job in jobs] if len(jobs) < 2
                  else list(self._readers.map(one, jobs)))
        for (block, _, _), exc in zip(jobs, failed, strict=True):
            if exc is not None:  # here, not on the readers: the tree is the engine thread's
                self._unusable(block, exc)
        return [exc is None for exc in failed]

    def _unusable(self, block: Block, exc: Exception) -> None:
        path = self.index.block_path(block.hash)
        log.warning("prefix cache: removing unusable block file %s (%s)", path.name, exc)
        if not isinstance(exc, OldBlock):  # (an older mlxc's, on a shared folder)
            self.blocks_damaged += 1
        _unlink(path)
        self._forget(block)

    def _forget(self, block: Block) -> None:
        self.tree.forget_disk(block.hash)
        self.drop([block.hash])

    def flush(self) -> None:
        """Wait until every queued write is on disk (tests, benchmarks, shutdown)."""
        self._jobs.join()

    def close(self) -> None:
        self._readers.shutdown()
        self._jobs.put(None)
        self._writer.join(60)
        self.index.close()

    # -- writer thread -------------------------------------------------------------------------

    def _run(self) -> None:
        index = BlockIndex(self.directory, writer=True)
        try:
            while True:
                job = self._jobs.get()
                try:
                    if job is None:
                        return
                    self._do(index, *job)
                except DISK_ERRORS as exc:  # a full or broken disk costs reuse, never an answer
                    log.warning("prefix cache: cannot write the disk tier (%s)", exc)
                    if job[0] == "write":
                        job[1].pending = False
                        self.tree.forget_disk(job[1].hash)
                except Exception:  # the writer must outlive any one bad job
                    log.exception("prefix cache: writer failed on one job")
                finally:
                    self._jobs.task_done()
        finally:
            index.close()

    def _do(self, index: BlockIndex, kind: str, *args: Any) -> None:
        if kind == "write":
            self._write(index, *args)
        elif kind == "touch":
            index.touch_blocks(args[0])
        elif kind == "drop":
            for h in args[0]:
                index.remove_block(h)
        elif kind == "counts":
            index.add_counts(args[0])
        index.bound_wal()
        self._totals(index)

    def _totals(self, index: BlockIndex) -> None:
        self.index_bytes = index.index_bytes()  # in the budget, and in `nbytes`
        self.nbytes = index.rows_bytes() + self.index_bytes
        self.nblocks = index.block_count()

    def _write(self, index: BlockIndex, block: Block, header: BlockHeader, views: list,
               size: int, _arrays: list) -> None:
        try:
            self._write_now(index, block, header, views)
        finally:
            with self._queued_lock:
                self._queued -= size

    def _write_now(self, index: BlockIndex, block: Block, header: BlockHeader,
                   views: list) -> None:
        from mlxc.engine.kv.block_file import data_offset, encode_header

        size = data_offset(len(encode_header(header))) + sum(v.nbytes for v in views)
        dropped = index.reserve(self.root, block.hash, block.parent, block.start,
                                list(block.tokens), size, self.budget)
        if dropped is None:  # there already (another process), or larger than the budget
            block.pending = False
            block.on_disk = index.block_path(block.hash).exists()
            self.tree.forget_disk(block.hash) if not block.on_disk else None
            return
        for kind, key in dropped:
            if kind == "block":
                self.tree.forget_disk(key)
        try:
            temp, size = write_temp(index.block_path(block.hash), header, views, self.fsync)
        except BaseException:
            index.remove_block(block.hash)
            raise
        self.bytes_written += size
        block.on_disk, block.pending = index.place(block.hash, temp), False
        if not block.on_disk:  # evicted by another writer meanwhile
            self.tree.forget_disk(block.hash)

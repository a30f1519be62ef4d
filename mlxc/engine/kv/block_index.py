"""The block rows of the prefix index (index.sqlite, next to whole states and counters): which
blocks are on disk, their sizes and last use. No MLX. Process-safe (SQLite WAL); each
connection belongs to the thread that opened it.

A block's row is written *before* its file (one transaction that makes room under the budget
and reserves the bytes), so several processes writing at once never exceed the budget. A row
whose file never came (a kill in between) is swept at the next start; a whole file without a
row (its row evicted or the index rebuilt) is adopted from its header.
"""

from __future__ import annotations

import logging
import os
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from mlxc.engine.kv.block_file import FORMAT, SUFFIX, BadBlock, OldBlock, read_header
from mlxc.engine.kv.index import PrefixIndex, pack_tokens
from mlxc.sidecar import make_private_dirs

log = logging.getLogger("mlxc.prefix")
BLOCKS_DIR = "blocks"
TEMP_AGE = 600.0  # a temporary file this old belongs to no live writer
WRITE_TIMEOUT = 120.0  # a reserved block not in place after this long: its writer died
# Room kept for the index to grow past what a reservation counts: the database's new pages,
# and the WAL past WAL_LIMIT by each writer's job since it last cut it (a job writes at most
# ~6 pages of 4 KiB; measured: 20.6 KB between two reservations).
INDEX_GROWTH = 64 << 10


@dataclass(frozen=True)
class BlockRow:
    hash: str
    seq: int
    parent: str
    start: int
    tokens: array
    nbytes: int
    writing: bool = False


class BlockIndex(PrefixIndex):
    """Block rows: reserve (make room, then record), list since a sequence number, touch,
    remove; and the start-up sweep that reconciles rows with files."""

    def __init__(self, directory: Path, writer: bool = False) -> None:
        if writer:  # it checkpoints the WAL itself (`bound_wal`)
            self.wal_pages = 0
        super().__init__(directory)
        self.blocks = self.directory / BLOCKS_DIR
        make_private_dirs(self.blocks)

    def block_path(self, h: str) -> Path:
        return self.blocks / (h + SUFFIX)

    def rows_since(self, root: str, seq: int) -> list[BlockRow]:  # type: ignore[override]
        """Blocks of one model recorded after `seq`, including those still being written
        (`writing`: not readable yet)."""
        cursor = self._db.execute(
            "SELECT hash, seq, parent, start, tokens, nbytes, writing, used FROM blocks "
            "WHERE root = ? AND seq > ? ORDER BY seq",
            (root, seq),
        )
        stale = time.time() - WRITE_TIMEOUT
        return [BlockRow(h, s, p, st, _tokens(t), n, bool(w) and u > stale)
                for h, s, p, st, t, n, w, u in cursor]

    def reserve(self, root: str, h: str, parent: str, start: int, tokens: list[int],
                nbytes: int, budget: int) -> list[tuple[str, str]] | None:
        """Record a block about to be written, first dropping least recently used rows and files
        (blocks or whole states, any model) until it fits the budget, which counts the index's
        own files too. None if it is there already or cannot fit (then nothing is dropped);
        else the (kind, id) of what was dropped."""
        budget -= INDEX_GROWTH
        if nbytes > budget:
            return None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM blocks WHERE hash = ?", (h,)).fetchone():
                db.execute("COMMIT")
                return None
            total = self.budgeted_bytes()
            dropped: list[tuple[str, str]] = []
            if total + nbytes > budget:
                # Not a block another writer is still writing (unless it died long ago).
                for kind, key, size, _used, _start in db.execute(
                    "SELECT 'block', hash, nbytes, used, start FROM blocks "
                    "WHERE writing = 0 OR used < ? UNION ALL "
                    "SELECT 'state', id, nbytes, used, n_tokens FROM entries "
                    "ORDER BY used, start DESC", (time.time() - WRITE_TIMEOUT,)
                ).fetchall():
                    if total + nbytes <= budget:
                        break
                    dropped.append((kind, key))
                    total -= size
                if total + nbytes > budget:  # the index and blocks being written leave no room
                    db.execute("COMMIT")
                    return None
                for kind, key in dropped:
                    table, column = ("blocks", "hash") if kind == "block" else ("entries", "id")
                    db.execute(f"DELETE FROM {table} WHERE {column} = ?", (key,))
                # Files go before the commit: no other writer sees the room before it is made
                # (a kill here leaves rows without files, swept at the next start).
                self.delete_files(dropped)
            db.execute(
                "INSERT INTO blocks (hash, root, parent, start, n_tokens, tokens, nbytes, used,"
                " format) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (h, root, parent, start, len(tokens), pack_tokens(tokens), nbytes, time.time(),
                 FORMAT),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return dropped

    def place(self, h: str, temp: Path) -> bool:
        """Rename a written block into place, if its row is still there (not evicted while it
        was written); under the write lock, so no eviction runs in between."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            if db.execute("SELECT 1 FROM blocks WHERE hash = ?", (h,)).fetchone() is None:
                temp.unlink(missing_ok=True)
                db.execute("COMMIT")
                return False
            os.replace(temp, self.block_path(h))
            db.execute("UPDATE blocks SET writing = 0 WHERE hash = ?", (h,))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            temp.unlink(missing_ok=True)
            raise
        return True

    def delete_files(self, dropped: list[tuple[str, str]]) -> None:
        for kind, key in dropped:
            path = self.block_path(key) if kind == "block" else self.path_of(key)
            _unlink(path)

    def touch_blocks(self, hashes: list[str]) -> None:
        """Mark a chain used now, its first blocks most recently: evicted after the rest."""
        now = time.time()
        self._db.executemany(
            "UPDATE blocks SET used = ? WHERE hash = ?",
            [(now - i * 1e-6, h) for i, h in enumerate(hashes)],
        )

    def remove_block(self, h: str) -> None:
        # The file first: room is never counted free while its bytes are still on disk.
        _unlink(self.block_path(h))
        self._db.execute("DELETE FROM blocks WHERE hash = ?", (h,))

    def block_count(self) -> int:
        return int(self._db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0])

    # -- start-up ------------------------------------------------------------------------------

    def reconcile(self, grace: float = 30.0) -> None:
        """Make rows and files agree after a crash or damage: remove blocks of an earlier
        format, sweep dead temporary files, drop rows whose file never came, adopt whole files
        that have no row, remove the rest."""
        old = self._sweep_old_format()
        rows = dict(self._db.execute("SELECT hash, used FROM blocks").fetchall())
        names = set()
        for entry in os.scandir(self.blocks):
            if entry.name.startswith(".tmp-"):
                _sweep_temp(entry)
            elif entry.name.endswith(SUFFIX):
                names.add(entry.name.removesuffix(SUFFIX))
        cutoff = time.time() - grace
        for h, used in rows.items():
            if h not in names and used < cutoff:
                self._db.execute("DELETE FROM blocks WHERE hash = ?", (h,))
            elif h in names:  # a kill between the rename and the flag's update
                self._db.execute("UPDATE blocks SET writing = 0 WHERE hash = ?", (h,))
        for h in names - rows.keys():
            path = self.block_path(h)
            try:
                header = read_header(path)
                if header.hash != h:
                    raise BadBlock("named after another block")
            except FileNotFoundError:
                continue
            except OldBlock:
                _unlink(path)
                old += 1
                continue
            except (BadBlock, OSError) as exc:
                log.warning("prefix cache: removing unusable block file %s (%s)", path.name, exc)
                _unlink(path)
                continue
            self._db.execute(
                "INSERT OR IGNORE INTO blocks (hash, root, parent, start, n_tokens, tokens, "
                "nbytes, used, writing, format) VALUES (?, ?, ?, ?, ?, ?, ?, ?, 0, ?)",
                (h, header.root, header.parent, header.start, len(header.tokens),
                 pack_tokens(header.tokens), path.stat().st_size, 0.0, FORMAT),
            )
        if old:
            log.warning("prefix cache: removed %d block files of an earlier format (no "
                        "checksum: their KV cannot be trusted)", old)

    def _sweep_old_format(self) -> int:
        """Blocks recorded in an earlier format (no checksum), rows and files: a damaged one
        would be reused unnoticed, and a prefill writes them again."""
        old = [row[0] for row in self._db.execute(
            "SELECT hash FROM blocks WHERE format < ?", (FORMAT,))]
        for h in old:
            self.remove_block(h)
        return len(old)

    def sweep_old_states(self) -> None:
        """Whole states saved by versions before blocks (format 1): never read now."""
        old = [row[0] for row in self._db.execute("SELECT id FROM entries WHERE version < 2")]
        for entry_id in old:
            self.remove(entry_id)
        if old:
            log.warning("prefix cache: removed %d whole-state files of an earlier version",
                        len(old))


def _tokens(blob: bytes) -> array:
    values = array("i")
    values.frombytes(blob)
    return values


def _sweep_temp(entry: os.DirEntry) -> None:
    """A writer's temporary file, once its process is gone (or it is old)."""
    try:
        pid = int(entry.name.split("-")[1])
        alive = pid != os.getpid()
        if alive:
            os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError):
        alive = False
    except PermissionError:
        alive = True
    try:
        if not alive or entry.stat(follow_symlinks=False).st_mtime < time.time() - TEMP_AGE:
            os.unlink(entry.path)
    except OSError:
        pass


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:  # a folder under a block's name: left alone, never read
        log.warning("prefix cache: cannot remove %s (%s)", path.name, exc)

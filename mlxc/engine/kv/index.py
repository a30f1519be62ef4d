"""The prefix cache's on-disk index and counters: one SQLite file next to the state files.

No MLX here: `mlxc cache stats` and `cache clear` read and empty the disk tier through this
module alone. Process-safe (SQLite WAL, every change one transaction); each connection
belongs to the thread that opened it.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import time
from array import array
from dataclasses import dataclass
from pathlib import Path

from mlxc.disk_full import disk_refused
from mlxc.sidecar import make_private_dirs

INDEX_FILE = "index.sqlite"
INDEX_FILES = (INDEX_FILE, INDEX_FILE + "-wal", INDEX_FILE + "-shm")  # in the disk budget
# The WAL counts in the disk budget: checkpointed at 64 pages (256 KiB) and cut back to that
# after (by default it grows to 4 MiB and stays, a fifth of a 20 MB budget). Writing a block
# adds ~12 pages: a checkpoint (and an fsync of the index) every ~5 blocks.
WAL_PAGES = 64
OPEN_TRIES = 5  # opening while another process creates the index fails at once: retried
WAL_LIMIT = 256 << 10
STATE_SUFFIX = ".safetensors"
log = logging.getLogger("mlxc.prefix")
COUNTERS = (
    "hits", "misses", "memory_hits", "disk_hits", "tokens_reused", "tokens_prefilled",
    "memory_tokens_reused", "disk_tokens_reused", "bytes_written", "writes_skipped",
    "blocks_damaged",  # block files that failed their checks when read, and were dropped
)
STATE_VERSION = 2  # whole states (untrimmable caches); 1: every model, before blocks

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- grows on every write: others' new rows are seq > n
    id TEXT UNIQUE NOT NULL,                -- sha256(fingerprint, tokens); also the file name
    fingerprint TEXT NOT NULL,
    n_tokens INTEGER NOT NULL,
    tokens BLOB NOT NULL,                   -- int32 array
    nbytes INTEGER NOT NULL,
    kind TEXT NOT NULL,
    used REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_used ON entries (used);
CREATE TABLE IF NOT EXISTS blocks (         -- KV blocks (kv/block_index.py)
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    hash TEXT UNIQUE NOT NULL,              -- chain hash; also the file name under blocks/
    root TEXT NOT NULL,                     -- the model's chain start
    parent TEXT NOT NULL,
    start INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL,
    tokens BLOB NOT NULL,
    nbytes INTEGER NOT NULL,                -- the file's size
    used REAL NOT NULL,
    writing INTEGER NOT NULL DEFAULT 1,     -- reserved, its file not yet in place
    format INTEGER NOT NULL DEFAULT 1       -- the file's (kv/block_file.py); 1: no checksum
);
CREATE INDEX IF NOT EXISTS blocks_used ON blocks (used);
CREATE INDEX IF NOT EXISTS blocks_new ON blocks (root, seq);  -- each lookup asks what is new
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class IndexRow:
    id: str
    seq: int
    tokens: list[int]
    nbytes: int
    kind: str


def pack_tokens(tokens: list[int]) -> bytes:
    return array("i", tokens).tobytes()


def unpack_tokens(blob: bytes) -> list[int]:
    values = array("i")
    values.frombytes(blob)
    return values.tolist()


class PrefixIndex:
    """Which states are on disk (by model fingerprint and tokens), their sizes and last use,
    and the hit/miss counters that survive restarts."""

    wal_pages = WAL_PAGES  # SQLite's own checkpoints; 0: its owner calls `bound_wal` instead

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        make_private_dirs(self.directory)
        for attempt in range(OPEN_TRIES):
            try:
                self._db = self._open()
                return
            except sqlite3.DatabaseError as exc:
                if disk_refused(exc):  # a full disk is no damage: raised, nothing deleted
                    raise
                if not isinstance(exc, sqlite3.OperationalError):
                    self._rebuild(exc)  # a damaged index: its states cannot be trusted
                    return
                if attempt == OPEN_TRIES - 1:  # not damage: another process is creating it
                    raise  # (WAL mode being set: "locked"; a column it has just added:
                time.sleep(0.05 * (attempt + 1))  # "duplicate column"), never rebuilt for that

    def _rebuild(self, exc: Exception) -> None:
        log.warning("prefix cache: rebuilding the unreadable index in %s (%s)",
                    self.directory, exc)
        for path in [*self.directory.glob(INDEX_FILE + "*"), *self._state_files()]:
            path.unlink(missing_ok=True)
        self._db = self._open()

    def _open(self) -> sqlite3.Connection:
        self._private_files()
        db = sqlite3.connect(self.directory / INDEX_FILE, timeout=30, isolation_level=None)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(f"PRAGMA wal_autocheckpoint={self.wal_pages}")
            db.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")
            db.executescript(_SCHEMA)
            columns = [row[1] for row in db.execute("PRAGMA table_info(entries)")]
            if "version" not in columns:  # an index from before blocks: its states are format 1
                db.execute("ALTER TABLE entries ADD COLUMN version INTEGER NOT NULL DEFAULT 1")
            columns = [row[1] for row in db.execute("PRAGMA table_info(blocks)")]
            if "writing" not in columns:  # blocks written before the flag: all in place
                db.execute("ALTER TABLE blocks ADD COLUMN writing INTEGER NOT NULL DEFAULT 0")
            if "format" not in columns:  # blocks written before checksums: format 1
                db.execute("ALTER TABLE blocks ADD COLUMN format INTEGER NOT NULL DEFAULT 1")
        except sqlite3.DatabaseError:
            db.close()
            raise
        return db

    def _private_files(self) -> None:
        """The index 0600 whatever the umask: created so before SQLite opens it (SQLite gives
        its -wal and -shm files the database's mode), and tightened if an earlier version
        left it (or them) readable by others."""
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
            os.close(os.open(self.directory / INDEX_FILE, flags, 0o600))
        except FileExistsError:
            pass
        for name in INDEX_FILES:
            try:
                if stat.S_IMODE(os.stat(self.directory / name).st_mode) != 0o600:
                    os.chmod(self.directory / name, 0o600)
            except OSError:  # absent, or another user's (a read-only look is still fine)
                pass

    def index_bytes(self, wal_at_most: bool = False) -> int:
        """The index's own files on disk (database, WAL, shared memory); `wal_at_most`: the
        WAL as the budget counts it, at the most it grows to before it is cut (WAL_LIMIT), so
        writes that reserve nothing (touches, counters, blocks there already) never take
        room that blocks were given."""
        total = 0
        for name in INDEX_FILES:
            try:
                size = os.stat(self.directory / name).st_size
            except OSError:
                size = 0
            total += max(size, WAL_LIMIT) if wal_at_most and name == INDEX_FILES[1] else size
        return total

    def bound_wal(self) -> None:
        """Checkpoint the WAL and cut it to nothing once it is past WAL_LIMIT. SQLite's own
        (passive) checkpoints never restart it while some connection is always reading, and
        hold off this one (two busy servers on one folder grew it to 4 MB in 20 s): the block
        writers turn theirs off and call this after each job. Waits for readers to catch up
        (ms) and holds other writers meanwhile: for a writer thread, not the engine's."""
        try:
            if os.stat(self.directory / INDEX_FILES[1]).st_size <= WAL_LIMIT:
                return
        except OSError:
            return
        self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def _state_files(self) -> list[Path]:
        return list(self.directory.glob("*" + STATE_SUFFIX))

    def path_of(self, entry_id: str) -> Path:
        return self.directory / (entry_id + STATE_SUFFIX)

    # -- entries ---------------------------------------------------------------------------

    def rows_since(self, fingerprint: str, seq: int) -> list[IndexRow]:
        """Entries of one model written after `seq` (by any process)."""
        cursor = self._db.execute(
            "SELECT id, seq, tokens, nbytes, kind FROM entries "
            "WHERE fingerprint = ? AND seq > ? ORDER BY seq",
            (fingerprint, seq),
        )
        return [IndexRow(i, s, unpack_tokens(t), n, k) for i, s, t, n, k in cursor]

    def has(self, entry_id: str) -> bool:
        found = self._db.execute("SELECT 1 FROM entries WHERE id = ?", (entry_id,)).fetchone()
        return found is not None

    def put(self, entry_id: str, fingerprint: str, tokens: list[int], nbytes: int, kind: str
            ) -> int:
        """Record a state whose file is already in place; returns its seq."""
        cursor = self._db.execute(
            "INSERT OR REPLACE INTO entries (id, fingerprint, n_tokens, tokens, nbytes, kind, used,"
            " version) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (entry_id, fingerprint, len(tokens), pack_tokens(tokens), nbytes, kind, time.time(),
             STATE_VERSION),
        )
        return int(cursor.lastrowid)

    def touch(self, entry_id: str) -> None:
        self._db.execute("UPDATE entries SET used = ? WHERE id = ?", (time.time(), entry_id))

    def remove(self, entry_id: str) -> None:
        """Forget an entry and delete its file (missing files are fine)."""
        self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        try:
            self.path_of(entry_id).unlink(missing_ok=True)
        except OSError as exc:  # a folder under a state's name: left alone, never read
            log.warning("prefix cache: cannot remove %s (%s)", entry_id, exc)

    def evict_to(self, budget: int) -> list[str]:
        """Drop least recently used entries (any model) until the total fits the budget."""
        removed: list[str] = []
        total = self.budgeted_bytes()
        if total <= budget:
            return removed
        for entry_id, nbytes in self._db.execute("SELECT id, nbytes FROM entries ORDER BY used"):
            if total <= budget:
                break
            removed.append(entry_id)
            total -= nbytes
        for entry_id in removed:
            self.remove(entry_id)
        return removed

    def total_bytes(self) -> int:
        """Bytes on disk: whole states and blocks, every model, and the index itself (one
        budget for all)."""
        return self.rows_bytes() + self.index_bytes()

    def budgeted_bytes(self) -> int:
        """What the budget holds: `total_bytes` with the WAL at the most it grows to."""
        return self.rows_bytes() + self.index_bytes(wal_at_most=True)

    def rows_bytes(self) -> int:
        """Bytes of the whole states and blocks the index lists."""
        return int(self._db.execute(
            "SELECT (SELECT COALESCE(SUM(nbytes), 0) FROM entries)"
            " + (SELECT COALESCE(SUM(nbytes), 0) FROM blocks)"
        ).fetchone()[0])

    def count(self) -> int:
        """Whole states and blocks on disk."""
        return int(self._db.execute(
            "SELECT (SELECT COUNT(*) FROM entries) + (SELECT COUNT(*) FROM blocks)"
        ).fetchone()[0])

    def sweep(self, older_than: float = 600.0) -> None:
        """Remove rows whose file is gone, and files no row names (left by a kill between
        rename and index write, or an interrupted temp file) once they are old enough that
        no live writer can still own them."""
        known = {row[0] for row in self._db.execute("SELECT id FROM entries")}
        for entry_id in known:
            if not self.path_of(entry_id).exists():
                self._db.execute("DELETE FROM entries WHERE id = ?", (entry_id,))
        cutoff = time.time() - older_than
        for path in self._state_files():
            name = path.name.removesuffix(STATE_SUFFIX)
            try:
                if name not in known and path.stat().st_mtime < cutoff:
                    path.unlink()
            except OSError:
                pass

    # -- counters ----------------------------------------------------------------------------

    def counters(self) -> dict[str, int]:
        saved = dict(self._db.execute("SELECT name, value FROM counters"))
        return {name: int(saved.get(name, 0)) for name in COUNTERS}

    def add_counts(self, counts: dict[str, int]) -> None:
        self._db.executemany(
            "INSERT INTO counters (name, value) VALUES (?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            [(k, v) for k, v in counts.items() if v],
        )

    # -- whole tier --------------------------------------------------------------------------

    def clear(self) -> int:
        """Delete every state file and row, and reset the counters; returns entries removed."""
        ids = [row[0] for row in self._db.execute("SELECT id FROM entries")]
        blocks = self._db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0]
        self._db.execute("DELETE FROM entries")
        self._db.execute("DELETE FROM blocks")
        self._db.execute("DELETE FROM counters")
        for entry_id in ids:
            self.path_of(entry_id).unlink(missing_ok=True)
        for path in self._state_files():
            path.unlink(missing_ok=True)
        for path in (self.directory / "blocks").glob("*"):
            if path.is_file() or path.is_symlink():
                path.unlink(missing_ok=True)
        return len(ids) + blocks

    def close(self) -> None:
        self._db.close()


def summarize(counters: dict[str, int], disk_bytes: int, disk_entries: int,
              index_bytes: int = 0) -> dict:
    """The figures `cache stats` and /health show, from raw counters and disk totals
    (`disk_bytes` counts the index's own files, `index_bytes`, as the budget does)."""
    lookups = counters["hits"] + counters["misses"]
    prompt = counters["tokens_reused"] + counters["tokens_prefilled"]
    return {
        **counters,
        "hit_rate": counters["hits"] / lookups if lookups else 0.0,
        "prefill_tokens_saved": counters["tokens_reused"],
        "prefill_saved_fraction": counters["tokens_reused"] / prompt if prompt else 0.0,
        "disk_bytes": disk_bytes,
        "disk_entries": disk_entries,
        "index_bytes": index_bytes,
    }


def read_stats(directory: Path) -> dict:
    """Persisted figures for a folder, without creating it; zeros if there is no index yet."""
    if not (Path(directory) / INDEX_FILE).exists():
        return {**summarize(dict.fromkeys(COUNTERS, 0), 0, 0), "disk_blocks": 0,
                "shared_blocks": 0}
    index = PrefixIndex(directory)
    try:
        db = index._db
        blocks = int(db.execute("SELECT COUNT(*) FROM blocks").fetchone()[0])
        # Blocks that more than one stored sequence continues from, and their ancestors'
        # count is not kept here: this counts the branch points (a lower bound).
        shared = int(db.execute(
            "SELECT COUNT(*) FROM (SELECT parent FROM blocks GROUP BY parent "
            "HAVING COUNT(*) > 1) WHERE parent IN (SELECT hash FROM blocks)"
        ).fetchone()[0])
        own = index.index_bytes()
        figures = summarize(index.counters(), index.rows_bytes() + own, index.count(), own)
        return {**figures, "disk_blocks": blocks, "shared_blocks": shared}
    finally:
        index.close()

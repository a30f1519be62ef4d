"""A full disk told apart from a damaged SQLite file. SQLite says "database or disk is full"
or "disk I/O error" when a write is refused, and both are DatabaseErrors, as damage is: a
store that took them for damage would tell the user to delete an intact cache. Imports
nothing heavy; shared by the response store and open to the prefix cache's index.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

DISK_ERRORS = (OSError, sqlite3.Error)  # a full or broken disk: costs reuse, never an answer


def disk_refused(exc: BaseException) -> bool:
    """Whether `exc` (or what it was raised while handling: diskcache's ROLLBACK can fail
    after SQLite gave up) is the disk refusing a write, not SQLite misreading the file."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        name = getattr(exc, "sqlite_errorname", "") or ""
        if name.startswith(("SQLITE_FULL", "SQLITE_IOERR")):
            return True
        exc = exc.__context__
    return False


def sound(db: Path) -> bool:
    """Whether SQLite reads every page of `db` (absent or empty: nothing to damage). Read-only
    and immutable: it writes nothing, so it works on a full disk."""
    try:
        with open(db, "rb") as f:
            header = f.read(16)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    if not header:
        return True
    if header != b"SQLite format 3\0":
        return False
    try:
        con = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro&immutable=1", uri=True)
        try:
            return con.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        finally:
            con.close()
    except sqlite3.Error:
        return False

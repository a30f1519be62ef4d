"""A diskcache `Disk` that reads JSON only, whatever a row says.

diskcache's own `JSONDisk` writes JSON, but on read it honours the mode stored in each row:
a row planted in `cache.db` with mode "pickle" would be unpickled (code run) by the next
lookup, and a row naming a file `../../x` would be read, or deleted on eviction. A cache
folder is touched by backups, sync services and other tools, so a row is data to check:

- only the two modes JSONDisk writes are read (bytes in the row, or a value file);
- a value file must have diskcache's own name shape and be a regular file (a FIFO or a
  symlink is refused without blocking);
- the bytes must inflate (bounded) to a JSON object.

Anything else raises `ForeignRow`, an OSError, which diskcache itself turns into a counted
miss; the store then drops the row. Files are written 0600.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import stat
import threading
import zlib

from diskcache import JSONDisk
from diskcache.core import MODE_BINARY, MODE_RAW, UNKNOWN

# diskcache names value files `ab/cd/<28 hex>.val` (Disk.filename)
_VALUE_FILE = re.compile(r"[0-9a-f]{2}/[0-9a-f]{2}/[0-9a-f]{28}\.val")
MAX_VALUE_BYTES = 256 << 20  # an answer is at most a few MB; refuse a zip bomb


class ForeignRow(OSError):
    """A row mlxc did not write, or one damaged since: read as a miss, never decoded."""


class SafeJSONDisk(JSONDisk):
    """JSONDisk that refuses pickle, text and foreign files on read. Thread-safe."""

    def __init__(self, directory, compress_level=1, **kwargs):
        super().__init__(directory, compress_level, **kwargs)
        self._seen = threading.local()  # why the last fetch on this thread was refused

    def take_refusal(self) -> str | None:
        """Why this thread's last fetch was refused (once), or None."""
        reason = getattr(self._seen, "reason", None)
        self._seen.reason = None
        return reason

    def _refuse(self, reason: str) -> ForeignRow:
        self._seen.reason = reason
        return ForeignRow(reason)

    def fetch(self, mode, filename, value, read):
        if read:
            raise self._refuse("file handles are not served")
        if mode == MODE_RAW and isinstance(value, bytes | sqlite3.Binary | memoryview):
            data = bytes(value)
        elif mode == MODE_BINARY and isinstance(filename, str):
            data = self._read_value_file(filename)
        else:
            raise self._refuse(f"a row in mode {mode!r} (mlxc writes JSON only)")
        try:
            inflater = zlib.decompressobj()
            raw = inflater.decompress(data, MAX_VALUE_BYTES)
            if inflater.unconsumed_tail:
                raise ValueError("value larger than the limit")
            decoded = json.loads(raw.decode("utf-8"))
        except (ValueError, zlib.error, RecursionError) as exc:
            raise self._refuse(f"a value that is not compressed JSON ({exc})") from None
        if not isinstance(decoded, dict):
            raise self._refuse("a value that is not a JSON object")
        return decoded

    def _read_value_file(self, filename: str) -> bytes:
        if not _VALUE_FILE.fullmatch(filename):
            raise self._refuse(f"a value file outside the cache's own names: {filename!r}")
        path = os.path.join(self._directory, filename)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0))
        except OSError as exc:
            raise self._refuse(f"an unreadable value file ({exc.strerror})") from None
        with os.fdopen(fd, "rb") as reader:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_VALUE_BYTES:
                raise self._refuse(f"a value file that is not a regular file: {filename!r}")
            return reader.read()

    def get(self, key, raw):
        if not raw:  # JSONDisk stores keys as raw bytes; anything else would be unpickled
            raise ForeignRow("a key that is not raw JSON")
        return super().get(key, raw)

    def store(self, value, read, key=UNKNOWN):
        size, mode, filename, db_value = super().store(value, read, key=key)
        if filename:
            os.chmod(os.path.join(self._directory, filename), 0o600)
        return size, mode, filename, db_value

    def remove(self, file_path):
        # A planted row must not make eviction or clearing delete a file elsewhere.
        if isinstance(file_path, str) and _VALUE_FILE.fullmatch(file_path):
            super().remove(file_path)

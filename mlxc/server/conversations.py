"""Stored Responses: response id -> the response body and the conversation behind it, so a
later request can continue with `previous_response_id` (and GET /v1/responses/{id}).

Kept in the cache folder next to the response cache, as JSON only (mlxc.jsondisk: rows that
are not mlxc's JSON are refused, never unpickled). diskcache: thread- and process-safe, so
several servers on one folder see each other's responses; the oldest go past the size limit.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

SIZE_LIMIT = 256 << 20


class Conversations:
    """Opened on first use; calls block on SQLite (run them off the event loop)."""

    def __init__(self, directory: Path, size_limit: int = SIZE_LIMIT) -> None:
        self.directory = Path(directory)
        self.size_limit = size_limit
        self._cache = None

    def _open(self):
        if self._cache is None:
            import diskcache

            from mlxc.jsondisk import SafeJSONDisk

            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            os.chmod(self.directory, 0o700)  # conversations are private
            self._cache = diskcache.Cache(str(self.directory), disk=SafeJSONDisk,
                                          size_limit=self.size_limit,
                                          eviction_policy="least-recently-stored")
        return self._cache

    def get(self, response_id: str) -> dict[str, Any] | None:
        value = self._open().get(response_id)
        return value if isinstance(value, dict) else None

    def set(self, response_id: str, value: dict[str, Any]) -> None:
        self._open().set(response_id, value)

    def delete(self, response_id: str) -> bool:
        return bool(self._open().delete(response_id))

    def clear(self) -> int:
        """Remove every stored response; a store SQLite cannot read is removed whole (the
        same promise as the response cache: clearing always works). Returns how many."""
        import shutil
        import sqlite3

        if not (self.directory / "cache.db").exists():
            return 0
        try:
            return int(self._open().clear())
        except sqlite3.DatabaseError:
            self.close()
            self._cache = None
            shutil.rmtree(self.directory, ignore_errors=True)
            return 0

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

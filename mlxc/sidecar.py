"""Small JSON files mlxc keeps beside its data (a model's fingerprint, its measured memory
costs, the GPU's memory, the last conversation for `ask -c`): read without ever hanging or
trusting what is there, written whole or not at all, readable by their owner only. Losing one
only costs the work that made it.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

LIMIT = 1 << 20  # these files hold a few numbers


def read_json(path: Path, limit: int = LIMIT) -> Any:
    """The file's JSON value, or None if it is absent, unreadable, not JSON, over `limit`
    bytes, or not a regular file (a symlink is not followed; a FIFO is never waited on)."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > limit:
            return None
        with os.fdopen(fd, "rb", closefd=False) as f:
            return json.loads(f.read(limit + 1))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def make_private_dirs(folder: Path) -> None:
    """Create `folder` and any missing parents 0700 whatever the umask (mkdir's mode is masked
    by it: 0777 under umask 000); folders already there are left as they are (a model's own)."""
    missing = []
    for each in (folder, *folder.parents):
        if each.exists():
            break
        missing.append(each)
    for each in reversed(missing):
        each.mkdir(mode=0o700, exist_ok=True)
        os.chmod(each, 0o700)


def write_json(path: Path, value: Any) -> bool:
    """Write `value` under a temporary name and rename it into place, 0600 (a folder it makes,
    0700); False if it cannot be written (a read-only folder: the slow work is done again next
    time)."""
    try:
        make_private_dirs(path.parent)
        temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # a leftover temporary file keeps its mode through O_TRUNC
            json.dump(value, f, ensure_ascii=False)
        os.replace(temp, path)
    except OSError:
        return False
    return True

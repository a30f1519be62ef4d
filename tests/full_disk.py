"""A real full disk for tests: a 2 MB tmpfs mounted over a folder, filled to the last byte
and freed again. Mounting needs root (or CAP_SYS_ADMIN); elsewhere the tests skip."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


class SmallDisk:
    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.ballast = folder / "ballast"

    def fill(self) -> None:
        """Write until the filesystem says ENOSPC: every later write fails as on a full disk."""
        fd = os.open(self.ballast, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            while True:
                os.write(fd, b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC, exc
        finally:
            os.close(fd)

    def free(self) -> None:
        self.ballast.unlink()


@contextmanager
def small_disk(folder: Path, size: str = "2m") -> Iterator[SmallDisk]:
    """A tmpfs of `size` mounted on `folder` (created) for the block's duration."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("a real full disk needs a tmpfs mount: run as root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                              str(folder)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield SmallDisk(folder)
    finally:  # lazily: a server that has not quite exited must not keep it mounted
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)

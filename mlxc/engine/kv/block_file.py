"""One KV block on disk: a small JSON header (what the block is: its hash, its parent's, its
tokens, its arrays' shapes) followed by the arrays' raw bytes. No MLX here (numpy only), so the
writer thread never touches MLX and `cache stats` stays light.

Files are written to a temporary name and renamed into place, so a reader (or a restart after a
kill -9) sees a block whole or not at all. Reading opens without following symlinks and without
blocking (a FIFO under a block's name must not hang the engine) and accepts regular files only.
"""

from __future__ import annotations

import json
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

MAGIC = b"MLXCKVB1"
SUFFIX = ".kvb"
HEADER_LIMIT = 1 << 22  # 256 tokens and a few hundred arrays fit in far less
# MLX dtypes numpy has no name for travel as raw 16-bit words.
_RAW = {"bfloat16": np.uint16}


class BadBlock(ValueError):
    """A file that is not a whole, matching block (truncated, foreign, not a regular file)."""


@dataclass
class BlockHeader:
    hash: str
    parent: str
    root: str
    start: int  # position of the block's first token in the sequence
    tokens: list[int]
    arrays: list[dict]  # {"dtype", "shape", "offset", "nbytes"} in layer order
    quantized: bool = False

    def to_json(self) -> dict:
        return self.__dict__


def np_dtype(name: str):
    return _RAW.get(name) or np.dtype(name)


def encode_header(header: BlockHeader) -> bytes:
    return json.dumps(header.to_json(), separators=(",", ":")).encode()


def write_temp(path: Path, header: BlockHeader, buffers: list, fsync: bool) -> tuple[Path, int]:
    """Write a block under a temporary name next to `path` (the caller renames it into place);
    returns that name and the bytes written. `buffers` have the buffer protocol (memoryviews
    of evaluated MLX arrays)."""
    meta = encode_header(header)
    temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        total = 0
        with os.fdopen(fd, "wb", closefd=False) as f:
            total += f.write(MAGIC + struct.pack("<Q", len(meta)) + meta)
            for buffer in buffers:
                total += f.write(buffer)
        if fsync:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    return temp, total


def data_offset(meta_len: int) -> int:
    return len(MAGIC) + 8 + meta_len


def open_regular(path: Path) -> int:
    """A read-only descriptor for a regular file at `path`, never following a symlink and never
    waiting on a FIFO or device; BadBlock otherwise."""
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise BadBlock(f"cannot open it ({exc.strerror})") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise BadBlock("not a regular file")
    return fd


def read_block(path: Path) -> tuple[BlockHeader, bytearray, int]:
    """(header, the arrays' bytes, 0: where the arrays start in them). FileNotFoundError if it
    is gone, BadBlock if it is not a whole block file."""
    opened = open_block(path)
    data = bytearray(sum(int(a["nbytes"]) for a in opened.header.arrays))
    read_into(opened, [memoryview(data)])
    return opened.header, data, 0


def read_header(path: Path) -> BlockHeader:
    """Only the header, checked against the file's size (index rebuilds): no array bytes are
    read."""
    opened = open_block(path)
    opened.close()
    return opened.header


def arrays_of(header: BlockHeader, data: bytearray, start: int) -> list[np.ndarray]:
    """The block's arrays as numpy views of `data` (raw words for dtypes numpy lacks)."""
    out = []
    for spec in header.arrays:
        offset = start + int(spec["offset"])
        dtype = np_dtype(spec["dtype"])
        count = int(np.prod(spec["shape"])) if spec["shape"] else 1
        if count * np.dtype(dtype).itemsize != int(spec["nbytes"]):
            raise BadBlock("array sizes disagree")
        out.append(np.frombuffer(data, dtype, count, offset).reshape(spec["shape"]))
    return out


@dataclass
class OpenBlock:
    """A block file opened for reading: its header read and checked, its arrays not yet."""

    fd: int
    header: BlockHeader
    start: int  # where the arrays begin

    def close(self) -> None:
        os.close(self.fd)


IOV_MAX = 512  # buffers per readv call (POSIX guarantees at least 16; Linux and macOS 1024)


def open_block(path: Path) -> OpenBlock:
    """Open a block file and check its header against its size, reading no array bytes.
    FileNotFoundError if it is gone, BadBlock if it is not a whole block file."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, len(MAGIC) + 8, 0)
        if len(head) != len(MAGIC) + 8 or head[: len(MAGIC)] != MAGIC:
            raise BadBlock("not a block file")
        (meta_len,) = struct.unpack_from("<Q", head, len(MAGIC))
        if meta_len > min(HEADER_LIMIT, size):
            raise BadBlock("bad header length")
        try:
            header = BlockHeader(**json.loads(os.pread(fd, meta_len, len(MAGIC) + 8)))
        except (ValueError, TypeError) as exc:
            raise BadBlock(f"unreadable header ({exc})") from exc
        start, offset = data_offset(meta_len), 0
        for spec in header.arrays:  # laid out back to back, each its shape's size
            count = int(np.prod(spec["shape"])) if spec["shape"] else 1
            nbytes = int(spec["nbytes"])
            itemsize = np.dtype(np_dtype(spec["dtype"])).itemsize
            if int(spec["offset"]) != offset or count * itemsize != nbytes:
                raise BadBlock("array sizes disagree")
            offset += nbytes
        if size != start + offset:
            raise BadBlock(f"{size} bytes, its header says {start + offset}")
    except BaseException:
        os.close(fd)
        raise
    return OpenBlock(fd, header, start)


def read_into(block: OpenBlock, buffers: list[memoryview]) -> None:
    """Read the block's arrays straight into `buffers` (writable, one per array, in order: no
    copy in between), then close the file. BadBlock if the file ends early. Releases the GIL
    while it reads, so several blocks load at once on threads."""
    try:
        os.lseek(block.fd, block.start, os.SEEK_SET)
        todo = [b for b in buffers if b.nbytes]
        while todo:
            n = os.readv(block.fd, todo[:IOV_MAX])
            if n == 0:
                raise BadBlock("truncated while reading")
            while todo and n >= todo[0].nbytes:
                n -= todo.pop(0).nbytes
            if n:
                todo[0] = todo[0][n:]
    finally:
        block.close()

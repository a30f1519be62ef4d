"""One KV block on disk: a small JSON header (what the block is: its hash, its parent's, its
tokens, its arrays' shapes) followed by the arrays' raw bytes. No MLX here (numpy only), so the
writer thread never touches MLX and `cache stats` stays light.

A checksum (xxh3-64 of the header and the arrays' bytes, after the magic) is written with the
block and checked when it is read from disk: a file damaged in place (bit rot, a sync tool) with
its size and header intact would otherwise be reused as KV, and answer garbage. xxh3 rather
than zlib.crc32: ~5x faster here (4.9 against 0.9 GB/s on 256 MB; both release the GIL).
Format 1 files (no checksum) are not trusted: they are swept at start (kv/block_index.py).

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
import xxhash

MAGIC = b"MLXCKVB2"  # format 2: checksummed
OLD_MAGICS = (b"MLXCKVB1",)
FORMAT = 2
PREAMBLE = len(MAGIC) + 16  # magic, header length, checksum
SUFFIX = ".kvb"
HEADER_LIMIT = 1 << 22  # 256 tokens and a few hundred arrays fit in far less
# MLX dtypes numpy has no name for travel as raw 16-bit words.
_RAW = {"bfloat16": np.uint16}


class BadBlock(ValueError):
    """A file that is not a whole, matching block (truncated, foreign, not a regular file)."""


class OldBlock(BadBlock):
    """A block file of an earlier format (no checksum): never read."""


class DamagedBlock(BadBlock):
    """A block file whose bytes fail its checksum."""


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
    digest = xxhash.xxh3_64(meta)
    for buffer in buffers:
        digest.update(buffer)
    temp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        total = 0
        with os.fdopen(fd, "wb", closefd=False) as f:
            total += f.write(MAGIC + struct.pack("<QQ", len(meta), digest.intdigest()) + meta)
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
    return PREAMBLE + meta_len


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
    checksum: int = 0  # as written
    digest: object = None  # xxh3 of the header so far; the arrays' bytes are added as read

    def close(self) -> None:
        os.close(self.fd)


CHUNK = 1 << 18  # read and hash in pieces: the hash finds each one still in the CPU cache


def open_block(path: Path) -> OpenBlock:
    """Open a block file and check its header against its size, reading no array bytes.
    FileNotFoundError if it is gone, BadBlock if it is not a whole block file."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        head = os.pread(fd, PREAMBLE, 0)
        if head[: len(MAGIC)] in OLD_MAGICS:
            raise OldBlock("an earlier format, without a checksum")
        if len(head) != PREAMBLE or head[: len(MAGIC)] != MAGIC:
            raise BadBlock("not a block file")
        meta_len, checksum = struct.unpack_from("<QQ", head, len(MAGIC))
        if meta_len > min(HEADER_LIMIT, size):
            raise BadBlock("bad header length")
        meta = os.pread(fd, meta_len, PREAMBLE)
        try:
            header = BlockHeader(**json.loads(meta))
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
    return OpenBlock(fd, header, start, checksum, xxhash.xxh3_64(meta))


def read_into(block: OpenBlock, buffers: list[memoryview]) -> None:
    """Read the block's arrays straight into `buffers` (writable, one per array, in order: no
    copy in between) and check them against the checksum, then close the file. BadBlock if the
    file ends early, DamagedBlock if its bytes fail the checksum. Releases the GIL while it
    reads and hashes, so several blocks load at once on threads."""
    try:
        os.lseek(block.fd, block.start, os.SEEK_SET)
        for buffer in buffers:
            for at in range(0, buffer.nbytes, CHUNK):
                piece = buffer[at : at + CHUNK]
                _read_whole(block.fd, piece)
                block.digest.update(piece)
    finally:
        block.close()
    if block.digest.intdigest() != block.checksum:
        raise DamagedBlock("its bytes fail its checksum (damaged on disk)")


def _read_whole(fd: int, piece: memoryview) -> None:
    while piece.nbytes:
        n = os.readv(fd, [piece])
        if n == 0:
            raise BadBlock("truncated while reading")
        piece = piece[n:]

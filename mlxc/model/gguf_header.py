"""A GGUF file's metadata and tensor list, read from its header without touching the weights.

`mlxc models` reads every GGUF it finds. The `gguf` package's `GGUFReader` builds a numpy view
for every element of every array, so a file with a 150k-token vocabulary took seconds to open;
here the vocabulary and merges are skipped by their lengths and only scalars, strings and short
numeric arrays are kept. The same walk checks that the file holds all the bytes its tensors
need, so a truncated download is named before any conversion starts."""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from pathlib import Path

# GGUF value types -> struct format (8 string, 9 array are walked by hand)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_STRING, _ARRAY = 8, 9
_KEEP_ARRAY = 64  # numeric arrays up to this long are kept (per-layer head counts, ...)


class GGUFHeaderError(ValueError):
    """The file is not a readable GGUF; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ArrayInfo:
    """An array too long to keep (a vocabulary, merges): its length and item type only."""

    length: int
    item_type: int


@dataclass
class GGUFHeader:
    path: Path
    version: int
    metadata: dict = field(default_factory=dict)
    # name -> (shape, innermost first as GGUF lists it, GGML type id, data offset)
    tensors: dict[str, tuple[tuple[int, ...], int, int]] = field(default_factory=dict)
    data_start: int = 0

    def get(self, key: str, default=None):
        return self.metadata.get(key, default)


def read_header(path: Path) -> GGUFHeader:
    """Metadata and tensor list of `path`; GGUFHeaderError if it is not a whole GGUF file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise GGUFHeaderError(f"{path}: {size} bytes, too short for a GGUF file")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _walk(path, buf, size)
    except OSError as exc:
        raise GGUFHeaderError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _walk(path: Path, buf, size: int) -> GGUFHeader:
    if buf[:4] != b"GGUF":
        raise GGUFHeaderError(f"{path} is not a GGUF file: it does not start with 'GGUF'")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    if version not in (2, 3):
        raise GGUFHeaderError(f"{path} is GGUF version {version}; only versions 2 and 3 are read")
    header = GGUFHeader(path, version)
    pos = 24
    try:
        for _ in range(n_kv):
            key, pos = _string(buf, pos)
            (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            header.metadata[key], pos = _value(buf, pos, kind)
        for _ in range(n_tensors):
            name, pos = _string(buf, pos)
            (dims,) = struct.unpack_from("<I", buf, pos)
            shape = struct.unpack_from(f"<{dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * dims)
            pos += 4 + 8 * dims + 12
            header.tensors[name] = (tuple(shape), kind, offset)
    except (struct.error, UnicodeDecodeError, GGUFHeaderError) as exc:
        raise GGUFHeaderError(
            f"{path}: the header is damaged or cut off ({exc}); download the file again"
        ) from None
    alignment = int(header.metadata.get("general.alignment", 32) or 32)
    header.data_start = -(-pos // alignment) * alignment
    _check_data(header, size)
    return header


def _string(buf, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", buf, pos)
    end = pos + 8 + length
    if end > len(buf):
        raise GGUFHeaderError(f"a string at byte {pos} runs past the end of the file")
    return bytes(buf[pos + 8 : end]).decode("utf-8"), end


def _value(buf, pos: int, kind: int):
    if kind in _SCALARS:
        fmt = "<" + _SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buf, pos)
    if kind != _ARRAY:
        raise GGUFHeaderError(f"unknown value type {kind} at byte {pos}")
    item, length = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if item in _SCALARS:
        width = struct.calcsize(_SCALARS[item])
        end = pos + width * length
        if end > len(buf):
            raise GGUFHeaderError(f"an array at byte {pos} runs past the end of the file")
        if length <= _KEEP_ARRAY:
            return list(struct.unpack_from(f"<{length}{_SCALARS[item]}", buf, pos)), end
        return ArrayInfo(length, item), end
    if item == _STRING:  # a vocabulary or merges: skipped by the lengths
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(length):
            pos += 8 + unpack(buf, pos)[0]
        if pos > len(buf):
            raise GGUFHeaderError("a string array runs past the end of the file")
        return ArrayInfo(length, item), pos
    raise GGUFHeaderError(f"an array of value type {item} at byte {pos}")


def _check_data(header: GGUFHeader, size: int) -> None:
    """Every tensor's bytes must lie inside the file: a cut-off download fails here."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    need = header.data_start
    for name, (shape, kind, offset) in header.tensors.items():
        try:
            block, nbytes = GGML_QUANT_SIZES[GGMLQuantizationType(kind)]
        except (ValueError, KeyError):
            continue  # a type this gguf package does not know: refused by name later
        count = 1
        for d in shape:
            count *= d
        need = max(need, header.data_start + offset + count // block * nbytes)
        if count % block:
            raise GGUFHeaderError(f"{header.path}: tensor {name} has {count} values, not a "
                                  f"whole number of blocks of {block}; the file is damaged")
    if need > size:
        raise GGUFHeaderError(
            f"{header.path} is truncated: its tensors need {need} bytes but the file has "
            f"{size}; download it again"
        )


def type_name(kind: int) -> str:
    from gguf.constants import GGMLQuantizationType

    try:
        return GGMLQuantizationType(kind).name
    except ValueError:
        return f"type {kind}"

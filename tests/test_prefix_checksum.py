"""Block files carry a checksum: a block damaged in place (bit rot, a sync tool, a partial copy)
with its size and header intact is dropped, counted and warned about when it is read from disk,
and the request prefills as if it were absent; files of the format before checksums are not
trusted, and are removed at start. Real tiny model, real files, a restart between.
"""

from __future__ import annotations

import logging
import struct

import pytest
import test_prefix_blocks as blocks
from prefix_helpers import ask, flush, service, state_files
from test_prefix_blocks import BLOCK, chat

from mlxc.engine.kv.block_file import (
    PREAMBLE,
    BlockHeader,
    DamagedBlock,
    read_block,
    read_header,
    write_temp,
)
from mlxc.engine.kv.block_index import BlockIndex
from mlxc.engine.kv.index import read_stats

lively, cold = blocks.lively, blocks.cold  # the same fixtures


def _data_start(path) -> int:
    (meta_len,) = struct.unpack_from("<Q", path.read_bytes(), 8)
    return PREAMBLE + meta_len


def _flip(path, at: int, count: int) -> None:
    """Invert `count` bytes from `at`: size and header untouched."""
    data = bytearray(path.read_bytes())
    data[at : at + count] = bytes(b ^ 0xFF for b in data[at : at + count])
    path.write_bytes(bytes(data))


def test_a_block_damaged_in_place_is_dropped_counted_and_prefilled(lively, cold, tmp_path,
                                                                   caplog):
    messages = chat("Name a fox.")
    with service(lively, tmp_path, **BLOCK) as svc:
        first = ask(svc, messages)
        flush(svc)
    second = next(p for p in state_files(tmp_path) if read_header(p).start == 64)
    size = second.stat().st_size
    _flip(second, _data_start(second) + 100, 4096)  # the first layer's keys
    assert second.stat().st_size == size and read_header(second).start == 64
    follow = chat("Name a fox.", first.text, "Another?")
    with caplog.at_level(logging.WARNING, logger="mlxc.prefix"):
        with service(lively, tmp_path, **BLOCK) as svc:
            answer = ask(svc, follow)
            flush(svc)
            stats = svc.prefix_stats()
    assert answer.usage.cached_tokens == 64  # the block before it, and nothing from it on
    assert answer.text == cold(lively, follow)
    assert stats["blocks_damaged"] == 1
    assert caplog.text.count("fail its checksum") == 1
    read_block(second)  # written again by the follow-up's prefill, whole and intact
    assert read_stats(tmp_path / "prefix")["blocks_damaged"] == 1  # as `mlxc cache stats`
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mlxc.prefix"):
        with service(lively, tmp_path, **BLOCK) as svc:
            again = ask(svc, follow)
    assert again.usage.cached_tokens > 256 and again.text == answer.text
    assert "unusable" not in caplog.text


def test_a_checksum_covers_the_header_and_the_arrays(tmp_path):
    import numpy as np

    x = np.arange(64, dtype=np.float32)
    specs = [{"dtype": "float32", "shape": [64], "offset": 0, "nbytes": x.nbytes}]
    header = BlockHeader("h", "p", "r", 0, [123], specs)
    temp, _ = write_temp(tmp_path / "b.kvb", header, [memoryview(x).cast("B")], fsync=False)
    read_block(temp)
    good = temp.read_bytes()
    for where in (good.index(b"123"), len(good) - 1):  # a token digit, an array's last byte
        damaged = bytearray(good)
        damaged[where] ^= 0x02  # '1' -> '3': still a header that parses
        temp.write_bytes(bytes(damaged))
        with pytest.raises(DamagedBlock):
            read_block(temp)


def _as_format_1(path) -> None:
    """The file as mlxc wrote it before checksums: magic 1, header length, header, arrays."""
    data = path.read_bytes()
    (meta_len,) = struct.unpack_from("<Q", data, 8)
    meta = data[PREAMBLE : PREAMBLE + meta_len]
    path.write_bytes(b"MLXCKVB1" + struct.pack("<Q", meta_len) + meta + data[PREAMBLE + meta_len:])


def test_blocks_of_the_format_before_checksums_are_removed_at_start(lively, cold, tmp_path,
                                                                    caplog):
    messages = chat("Why?")
    with service(lively, tmp_path, **BLOCK) as svc:
        first = ask(svc, messages)
        flush(svc)
    files = state_files(tmp_path)
    for path in files:
        _as_format_1(path)
    index = BlockIndex(tmp_path / "prefix")
    index._db.execute("UPDATE blocks SET format = 1")  # as an index of that version has them
    orphan = files[-1].name.removesuffix(".kvb")  # and one file whose row is gone
    index._db.execute("DELETE FROM blocks WHERE hash = ?", (orphan,))
    index.close()
    follow = chat("Why?", first.text, "Are you sure?")
    with caplog.at_level(logging.WARNING, logger="mlxc.prefix"):
        with service(lively, tmp_path, **BLOCK) as svc:
            answer = ask(svc, follow)
            flush(svc)
            stats = svc.prefix_stats()
    assert f"removed {len(files)} block files of an earlier format" in caplog.text
    assert "unusable" not in caplog.text  # one line, at start, not one per file
    assert answer.usage.cached_tokens == 0 and answer.text == cold(lively, follow)
    assert stats["blocks_damaged"] == 0  # not damage: an older format
    for path in state_files(tmp_path):  # what is there now is the follow-up's, checksummed
        read_block(path)

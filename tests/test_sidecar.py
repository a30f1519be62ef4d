"""The small JSON files mlxc keeps to skip slow work (a model's fingerprint, its measured
memory costs, the GPU's memory): whatever sits under their names is never waited on nor
trusted, and they are written whole."""

from __future__ import annotations

import os
import threading

from mlxc.engine.batch.admission import KVCost, recall, remember
from mlxc.sidecar import LIMIT, read_json, write_json


def test_a_sidecar_round_trips(tmp_path):
    assert write_json(tmp_path / "a" / "x.json", {"n": 1})
    assert read_json(tmp_path / "a" / "x.json") == {"n": 1}
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["x.json"]  # no temporary left


def test_what_is_not_a_small_regular_json_file_reads_as_nothing(tmp_path):
    (tmp_path / "garbage.json").write_bytes(b"\x00{not json")
    (tmp_path / "big.json").write_text("[" + "1," * LIMIT + "1]")
    (tmp_path / "real.json").write_text('{"n": 1}')
    (tmp_path / "link.json").symlink_to(tmp_path / "real.json")
    (tmp_path / "folder.json").mkdir()
    for name in ("absent.json", "garbage.json", "big.json", "link.json", "folder.json"):
        assert read_json(tmp_path / name) is None, name


def test_a_fifo_under_a_sidecars_name_never_blocks(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    result = []
    reader = threading.Thread(target=lambda: result.append(read_json(tmp_path / "fifo.json")))
    reader.start()
    reader.join(10)
    assert not reader.is_alive() and result == [None]


def test_measured_costs_come_back_only_for_the_same_chunk(tmp_path):
    cost = KVCost(512.0, ((256.0, 4096),), 0, 1 << 20, 9.5, 512)
    remember(tmp_path / "m.json", cost)
    assert recall(tmp_path / "m.json", 512) == cost
    assert recall(tmp_path / "m.json", 256) is None
    (tmp_path / "m.json").write_text('{"per_token": "lots"}')
    assert recall(tmp_path / "m.json", 512) is None

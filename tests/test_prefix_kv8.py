"""8-bit KV on disk (`prefix_disk_bits=8`): blocks are written as MLX affine 8-bit K/V, read back
after a restart dequantized to the model's dtype, and are smaller; a damaged 8-bit file is
skipped with a warning; a process with the setting off never reuses them (their own chain root)
and leaves them alone. Real tiny model, real files.

8-bit K/V is an approximation: what holds is asserted (the reused KV is within the
quantization error of the full one); greedy answers are compared in benchmarks/prefix_kv8.py.
"""

from __future__ import annotations

import logging
import random

import mlx.core as mx
import numpy as np
import prefix_helpers as base
import pytest
from prefix_helpers import ask, flush, service, state_files

from mlxc.config import ConfigError, load_settings
from mlxc.engine.kv.block_file import (
    BlockHeader,
    arrays_of,
    np_dtype,
    read_block,
    read_header,
    write_temp,
)
from mlxc.engine.kv.block_kv import from_file, leaves, quantize, to_buffers

lively, cold = base.lively, base.cold  # the same fixtures
BLOCK = {"prefix_block_tokens": 16}
KV8 = {**BLOCK, "prefix_disk_bits": 8}
PROMPT = " ".join(f"Line {i}: the quick brown fox and the capital of France." for i in range(12))


def _tokens(n: int = 200) -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(3, 300) for _ in range(n)]


def _store(svc, tokens: list[int]) -> None:
    """Prefill and store `tokens` on the engine thread, as the engine does; wait for the disk."""
    def run(engine):
        cache = engine.prompt_cache
        state, todo = cache.fetch(tokens)
        cache._prefill(state, todo)
        cache.store(tokens, state)
        cache.flush()

    svc.engine().call(run).result()


def _reuse(svc, tokens: list[int]) -> tuple[int, dict, list[np.ndarray]]:
    """(tokens reused, per tier, every layer's K/V as float32 numpy) from a fetch."""
    def run(engine):
        state, reused, tiers = engine.prompt_cache.tiers.reuse(tokens)
        arrays = [x[..., :reused, :].astype(mx.float32) for layer in state for x in leaves(layer)]
        return reused, tiers, [np.array(x) for x in arrays]

    return svc.engine().call(run).result()


def _disk_bytes(cache) -> int:
    return sum(p.stat().st_size for p in state_files(cache))


def test_8bit_blocks_are_smaller_and_reused_from_disk_after_a_restart(lively, tmp_path):
    tokens = _tokens()
    full, kv8 = tmp_path / "full", tmp_path / "kv8"
    with service(lively, full, **BLOCK) as svc:
        _store(svc, tokens)
        full_written = svc.prefix_stats()["bytes_written"]
    with service(lively, kv8, **KV8) as svc:
        _store(svc, tokens)
        kv8_written = svc.prefix_stats()["bytes_written"]
    assert all(read_header(p).quantized for p in state_files(kv8))
    assert not any(read_header(p).quantized for p in state_files(full))
    # The tiny model's float32 K/V: 1 byte + 8 bytes of scale and bias per 64 -> ~0.28x,
    # headers (token ids, specs) on top.
    assert kv8_written == _disk_bytes(kv8) < 0.5 * _disk_bytes(full) == 0.5 * full_written
    with service(lively, full, **BLOCK) as svc:
        _, _, exact = _reuse(svc, tokens)
    with service(lively, kv8, **KV8) as svc:  # a restart: the memory tier is empty
        reused, tiers, approx = _reuse(svc, tokens)
    assert reused == len(tokens) - 1 and tiers == {"memory": 0, "disk": reused}
    for a, b in zip(exact, approx, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype
        # Affine 8-bit: each value within one step (its group's range / 255; MLX moves the
        # grid so an edge is exact) of the full one; the array's range bounds the groups'.
        step = (a.max() - a.min()) / 255
        assert np.abs(a - b).max() <= step * 1.01
        assert not np.array_equal(a, b)  # really quantized


def test_answers_after_an_8bit_restart_use_the_disk_blocks(lively, cold, tmp_path):
    with service(lively, tmp_path, **KV8) as svc:
        first = ask(svc, prompt=PROMPT)
        flush(svc)
    with service(lively, tmp_path, **KV8) as svc:
        again = ask(svc, prompt=PROMPT + " Why?")
        stats = svc.prefix_stats()
    assert again.usage.cached_tokens >= first.usage.prompt_tokens - 1
    assert stats["disk_hits"] == 1 and stats["disk_tokens_reused"] == again.usage.cached_tokens
    assert again.text  # an answer (identity with cold is measured, not promised, for 8-bit)


def test_the_setting_off_ignores_8bit_blocks_and_leaves_them(lively, cold, tmp_path, caplog):
    with service(lively, tmp_path, **KV8) as svc:
        ask(svc, prompt=PROMPT)
        flush(svc)
    files = {p: p.stat().st_size for p in state_files(tmp_path)}
    assert files and all(read_header(p).quantized for p in files)
    with caplog.at_level(logging.WARNING, logger="mlxc.prefix"):
        with service(lively, tmp_path, **BLOCK) as svc:  # the default: full precision
            off = ask(svc, prompt=PROMPT + " Why?")
            flush(svc)
    assert off.usage.cached_tokens == 0  # 8-bit KV is never reused with the setting off
    assert off.text == cold(lively, prompt=PROMPT + " Why?")
    assert "unusable" not in caplog.text
    assert all(p.exists() and p.stat().st_size == n for p, n in files.items())
    with service(lively, tmp_path, **KV8) as svc:  # still there for the setting on
        on = ask(svc, prompt=PROMPT + " Why?")
    assert on.usage.cached_tokens > 100


def _rewrite_header(path, change) -> None:
    """A header changed and written with a checksum that matches it: what the reader's own
    checks must catch, past the checksum."""
    header, data, start = read_block(path)
    meta = header.to_json()
    change(meta)
    temp, _ = write_temp(path, BlockHeader(**meta), [memoryview(data)[start:]], fsync=False)
    temp.replace(path)


def _bad_recipe(meta) -> None:
    meta["arrays"][0]["quant"]["shape"][2] += 1  # more tokens than the data holds


def _bad_dtype(meta) -> None:
    meta["arrays"][0]["quant"]["dtype"] = "uint32"


def _bad_bits(meta) -> None:  # 4-bit words would hold twice the values
    meta["arrays"][0]["quant"]["bits"] = 4


def _no_recipe(meta) -> None:  # packed words, scales and biases taken as three K/V arrays
    del meta["arrays"][0]["quant"]


DAMAGE = {"recipe": _bad_recipe, "dtype": _bad_dtype, "bits": _bad_bits, "missing": _no_recipe}


@pytest.mark.parametrize("how", ["truncated", *DAMAGE])
def test_a_damaged_8bit_block_is_skipped_with_a_warning(lively, cold, tmp_path, how, caplog):
    with service(lively, tmp_path, **KV8) as svc:
        ask(svc, prompt=PROMPT)
        flush(svc)
    path = next(p for p in state_files(tmp_path) if read_header(p).start == 0)
    if how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        _rewrite_header(path, DAMAGE[how])
    with caplog.at_level(logging.WARNING, logger="mlxc.prefix"):
        with service(lively, tmp_path, **KV8) as svc:
            answer = ask(svc, prompt=PROMPT + " Why?")
    assert answer.usage.cached_tokens == 0  # the first block is gone: nothing after it is
    assert answer.text == cold(lively, prompt=PROMPT + " Why?")
    assert "removing unusable block file" in caplog.text


EPS = {"float32": 1e-6, "float16": 2**-10, "bfloat16": 2**-7}


@pytest.mark.parametrize("dtype", list(EPS))
@pytest.mark.parametrize("shape", [(1, 3, 16, 64), (1, 3, 7, 64), (1, 2, 16, 16), (1, 2, 7, 16),
                                   (1, 2, 5, 8)])
def test_a_block_file_round_trips_in_either_format(tmp_path, dtype, shape):
    """The reader takes 8-bit and full arrays alike. Groups of 64 or 32 values: within a
    token's head vector, else over a head's tokens, else over the heads too; a block with an
    array no group size divides (2 x 5 x 8 values) stays whole."""
    x = mx.random.normal(shape).astype(getattr(mx, dtype))
    arrays = [x, x * 2]
    if shape == (1, 3, 7, 64):  # odd 16-bit scale counts between 4-byte words
        arrays = [x, x[:, :1], x * 2]
    packed, notes = quantize(arrays, 8)
    mx.eval(packed)
    specs, views = to_buffers(packed, notes)
    header = BlockHeader("h", "p", "r", 0, list(range(shape[2])), specs, any(notes))
    temp, _ = write_temp(tmp_path / "b.kvb", header, views, fsync=False)
    header, data, start = read_block(temp)
    back = from_file(header.arrays, arrays_of(header, data, start))
    whole = shape == (1, 2, 5, 8)
    assert header.quantized is not whole and len(specs) == len(arrays) * (1 if whole else 3)
    for spec in header.arrays:  # each at a multiple of its element size (one read buffer)
        assert spec["offset"] % np.dtype(np_dtype(spec["dtype"])).itemsize == 0
    for a, b in zip(arrays, back, strict=True):
        assert b.shape == a.shape and b.dtype == a.dtype
        a32, b32 = a.astype(mx.float32), b.astype(mx.float32)
        error = mx.abs(a32 - b32).max().item()
        # One step of the array's range, and the dtype's own rounding of the result.
        bound = (a32.max() - a32.min()).item() / 255 + mx.abs(a32).max().item() * EPS[dtype]
        assert error == 0 if whole else 0 < error <= bound


def test_a_block_is_quantized_whole_or_not_at_all():
    """One array no group size divides keeps its whole block at full precision, so no array's
    words ever follow an odd count of 16-bit values in the file."""
    good, odd = mx.zeros((1, 3, 7, 64), mx.bfloat16), mx.zeros((1, 1, 5, 9), mx.bfloat16)
    assert len(quantize([good, good], 8)[0]) == 6
    arrays, notes = quantize([good, odd, good], 8)
    assert arrays[1] is odd and len(arrays) == 3 and notes == [None] * 3


def test_the_setting_is_read_from_the_environment_and_checked(monkeypatch):
    monkeypatch.setenv("MLXC_PREFIX_DISK_BITS", "8")
    assert load_settings().prefix_disk_bits == 8
    monkeypatch.setenv("MLXC_PREFIX_DISK_BITS", "4")
    with pytest.raises(ConfigError, match="0 \\(off\\) or 8"):
        load_settings()
    monkeypatch.delenv("MLXC_PREFIX_DISK_BITS")
    assert load_settings().prefix_disk_bits == 0

"""The prefix cache's blocks: a shared system prompt is stored once, a turn writes only its new
tokens, a kill -9 during writes leaves a loadable store, files that are not whole blocks never
block, budgets hold with several writers, two servers share one folder, old files are swept.

Small blocks (64 tokens) so the tiny model's short conversations span several of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import prefix_helpers as base
import pytest
from prefix_helpers import SYSTEM, TEXT, ask, conversation, flush, service, state_files

from mlxc.engine.kv.block_file import read_header
from mlxc.engine.kv.index import PrefixIndex

lively, cold, sliding = base.lively, base.cold, base.sliding  # the same fixtures
BLOCK = {"prefix_block_tokens": 64}
LONG_SYSTEM = SYSTEM * 2  # ~300 tokens: four whole blocks and a partial one


def chat(user: str, *turns: str) -> list[dict]:
    messages = conversation(user, *turns)
    messages[0]["content"] = LONG_SYSTEM
    return messages


def kv_bytes_per_token(svc) -> int:
    # The tiny llama: 2 layers x (keys, values) x 2 heads x 16 dims x float32.
    return 2 * 2 * 2 * 16 * 4


def test_a_shared_system_prompt_is_stored_once(lively, cold, tmp_path):
    with service(lively, tmp_path, **BLOCK) as svc:
        first = ask(svc, chat("What is the capital of France?"))
        flush(svc)
        one = svc.prefix_stats()
        second = ask(svc, chat("Name a fox."))
        flush(svc)
        two = svc.prefix_stats()
    state = first.usage.prompt_tokens * kv_bytes_per_token(svc)
    assert second.usage.cached_tokens >= 256  # the system prompt's blocks
    assert second.text == cold(lively, chat("Name a fox."))
    assert two["shared_blocks"] >= 4
    # The second conversation adds its own tokens, continuing from the head of the block it
    # diverges in (nothing of the first is written again), not a state.
    blocks = [s["disk_bytes"] - s["index_bytes"] for s in (one, two)]  # less the index's files
    assert blocks[1] - blocks[0] <= 0.2 * state


def _turns(svc, tokens: list[int], sizes: list[int]) -> list[tuple[int, int, int]]:
    """Store a conversation growing by `sizes` tokens a turn, on the engine thread, as the
    engine does; (new tokens, tokens reused, bytes written) per turn."""
    def run(engine):
        cache = engine.prompt_cache
        out, end = [], 0
        for size in sizes:
            end += size
            before = cache.stats()["bytes_written"]
            state, todo = cache.fetch(tokens[:end])
            cache._prefill(state, todo)
            cache.store(tokens[:end], state)
            cache.flush()
            out.append((size, cache.last_reused, cache.stats()["bytes_written"] - before))
        return out

    return svc.engine().call(run).result()


@pytest.mark.parametrize("block", [64, 256])
def test_a_turn_writes_only_its_new_tokens(lively, tmp_path, block):
    import random

    rng = random.Random(0)
    tokens = [rng.randrange(3, 300) for _ in range(900)]
    with service(lively, tmp_path, prefix_block_tokens=block) as svc:
        turns = _turns(svc, tokens, [300, 40, 90, 25, 200, 60, 45, 140])
    per_token = kv_bytes_per_token(None)
    done = 0
    for size, reused, written in turns:
        if done:
            assert reused == done
            # The KV of the new tokens, or of the open block rewritten with them when that
            # costs at most half as much again; headers (token ids, shapes) add a few percent.
            assert size * per_token <= written <= 1.5 * size * per_token * 1.1
        done += size


def test_two_servers_on_one_folder_read_each_others_blocks(lively, cold, tmp_path):
    with service(lively, tmp_path, **BLOCK) as one, service(lively, tmp_path, **BLOCK) as two:
        first = ask(one, chat("Why?"))
        flush(one)
        follow = chat("Why?", first.text, "Are you sure?")
        second = ask(two, follow)
        assert two.prefix_stats()["disk_hits"] == 1
    assert second.usage.cached_tokens >= first.usage.prompt_tokens
    assert second.text == cold(lively, follow)


_WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from prefix_helpers import ask, service, TEXT
    with service(Path({model!r}), Path({cache!r}), prefix_block_tokens=32,
                 prefix_disk_bytes={budget}) as svc:
        print("ready", flush=True)
        for i in range(1000):
            ask(svc, prompt=f"{{i}} {{TEXT}}"[: 200 + 7 * (i % 40)], max_tokens=2)
""")


def _writer(model: Path, cache: Path, budget: int = 1 << 30) -> subprocess.Popen:
    script = _WRITER.format(tests=str(Path(__file__).parent), model=str(model),
                            cache=str(cache), budget=budget)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "ready"
    return child


def _kill(child: subprocess.Popen) -> None:
    child.send_signal(signal.SIGKILL)
    child.wait(30)


def test_a_kill_9_during_writes_leaves_whole_blocks(lively, cold, tmp_path):
    child = _writer(lively, tmp_path)
    blocks = tmp_path / "prefix" / "blocks"
    deadline = time.monotonic() + 60
    try:
        while len(list(blocks.glob("*.kvb"))) < 12 and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        _kill(child)
    for path in state_files(tmp_path):  # every file is whole: its header and size agree
        read_header(path)
    prompt = f"0 {TEXT}"[:200] + " Paris?"  # the first prompt the killed process stored
    with service(lively, tmp_path, prefix_block_tokens=32) as svc:
        answer = ask(svc, prompt=prompt)
        flush(svc)  # its own writes done: any temporary file left is the killed one's
        assert not list(blocks.glob(".tmp-*"))  # swept at start
    assert answer.usage.cached_tokens >= 32
    assert answer.text == cold(lively, prompt=prompt)


@pytest.mark.parametrize("how", ["fifo", "symlink", "folder", "truncated"])
def test_a_file_that_is_not_a_whole_block_is_skipped_and_never_blocks(
    lively, cold, tmp_path, how, caplog
):
    messages = chat("Name a fox.")
    with service(lively, tmp_path, **BLOCK) as svc:
        first = ask(svc, messages)
    path = next(p for p in state_files(tmp_path) if read_header(p).start == 0)
    data = path.read_bytes()
    path.unlink()
    if how == "fifo":
        os.mkfifo(path)
    elif how == "symlink":
        (tmp_path / "outside").write_bytes(data)
        path.symlink_to(tmp_path / "outside")
    elif how == "folder":
        path.mkdir()
    else:
        path.write_bytes(data[: len(data) // 2])
    follow = chat("Name a fox.", first.text, "Another?")
    result = {}
    with caplog.at_level(logging.WARNING, logger="mlxc.prefix"):
        with service(lively, tmp_path, **BLOCK) as svc:
            worker = threading.Thread(target=lambda: result.update(a=ask(svc, follow)))
            worker.start()
            worker.join(60)
            assert not worker.is_alive(), "the engine hung on a bad file"
    assert result["a"].usage.cached_tokens == 0
    assert result["a"].text == cold(lively, follow)
    assert "unusable block file" in caplog.text
    if how == "symlink":
        assert (tmp_path / "outside").read_bytes() == data  # never followed, never touched


def _bytes_on_disk(prefix: Path) -> int:
    """The folder's bytes on disk, index included (it counts in the budget), taken while no
    writer can reserve room (the index's write lock), each block once (a temporary file renamed
    during the scan is the same block)."""
    import sqlite3

    db = sqlite3.connect(prefix / "index.sqlite", timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        sizes: dict[str, int] = {}
        for entry in os.scandir(prefix / "blocks"):
            try:
                size = entry.stat().st_size
            except FileNotFoundError:
                continue
            name = entry.name.rsplit("-", 1)[-1] if entry.name.startswith(".tmp-") else entry.name
            sizes[name] = max(size, sizes.get(name, 0))
        for name in ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm"):
            sizes[name] = (prefix / name).stat().st_size if (prefix / name).exists() else 0
        db.execute("COMMIT")
    finally:
        db.close()
    return sum(sizes.values())


def test_the_disk_budget_holds_with_two_writers(lively, tmp_path):
    budget = 1_000_000  # the index takes ~350 KB of it (its WAL up to 256 KiB)
    children = [_writer(lively, tmp_path, budget) for _ in range(2)]
    prefix = tmp_path / "prefix"
    peak = 0
    try:
        deadline, full = time.monotonic() + 30, 0
        while time.monotonic() < deadline and full < 100:  # 100 looks once it is full
            if (prefix / "blocks").exists():
                peak = max(peak, _bytes_on_disk(prefix))
                full += peak > budget // 2
            time.sleep(0.02)
    finally:
        for child in children:
            _kill(child)
    index = PrefixIndex(prefix)
    recorded = index.total_bytes()
    index.close()
    assert 0 < peak <= budget and recorded <= budget
    assert peak > budget // 2  # it was full: the writers evicted to go on


def test_whole_states_of_an_earlier_version_are_swept(lively, tmp_path, caplog):
    prefix = tmp_path / "prefix"
    index = PrefixIndex(prefix)
    index.put("a" * 40, "old", [1, 2, 3], 10, "assistant")
    index._db.execute("UPDATE entries SET version = 1")
    index.path_of("a" * 40).write_bytes(b"old state")
    index.close()
    with caplog.at_level(logging.WARNING, logger="mlxc.prefix"):
        with service(lively, tmp_path, **BLOCK) as svc:
            ask(svc, chat("Why?"), max_tokens=2)
    assert "1 whole-state files of an earlier version" in caplog.text
    assert not index.path_of("a" * 40).exists()


def test_a_fifo_under_a_whole_states_name_never_blocks(sliding, cold, tmp_path, caplog):
    """Untrimmable models keep whole states: the same guard on their files."""
    question = "What is the capital of France?"
    with service(sliding, tmp_path) as svc:
        first = ask(svc, conversation(question), max_tokens=6)
    for path in (tmp_path / "prefix").glob("*.safetensors"):
        path.unlink()
        os.mkfifo(path)
    follow = conversation(question, first.text, "And MLX?")
    result = {}
    with caplog.at_level(logging.WARNING, logger="mlxc.prefix"):
        with service(sliding, tmp_path) as svc:
            def run():
                result["a"] = ask(svc, follow, max_tokens=6)

            worker = threading.Thread(target=run)
            worker.start()
            worker.join(60)
            assert not worker.is_alive(), "the engine hung on a FIFO"
    assert result["a"].text == cold(sliding, follow, max_tokens=6)
    assert "removing unusable state file" in caplog.text


def test_a_full_write_queue_skips_blocks_and_counts_them(lively, cold, tmp_path):
    with service(lively, tmp_path, **BLOCK) as svc:
        def shrink(engine):
            tiers = engine.prompt_cache.tiers
            tiers.disk.queue_bytes = 1  # nothing fits: every write skipped ...
            tiers.tree.memory_limit = 0  # ... as blocks the memory tier holds cost it nothing

        svc.engine().call(shrink).result()
        first = ask(svc, chat("Why?"))
        flush(svc)
        stats = svc.prefix_stats()
        again = ask(svc, chat("Why?"))
    assert stats["writes_skipped"] >= 5 and stats["bytes_written"] == 0
    assert state_files(tmp_path) == []
    assert again.usage.cached_tokens == 0
    assert again.text == first.text == cold(lively, chat("Why?"))


def test_blocks_held_in_memory_are_written_whatever_the_queue_bytes(lively, tmp_path):
    with service(lively, tmp_path, **BLOCK) as svc:
        svc.engine().call(lambda e: setattr(e.prompt_cache.tiers.disk, "queue_bytes", 1)).result()
        ask(svc, chat("Why?"))
        flush(svc)
        stats = svc.prefix_stats()
    assert stats["writes_skipped"] == 0 and stats["bytes_written"] > 0
    assert len(state_files(tmp_path)) >= 5


# -- damaged files (the tiny models' default 256-token blocks) ------------------------------


def first_block(cache: Path) -> Path:
    return next(p for p in state_files(cache) if read_header(p).start == 0)


def _damage(path: Path, how: str, foreign: Path) -> None:
    if how == "garbage":
        path.write_bytes(b"\x00not a safetensors file" * 50)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "index":  # the index itself, not the state: every state goes with it
        prefix = next(p for p in path.parents if p.name == "prefix")
        (prefix / "index.sqlite").write_bytes(b"\x00not a database" * 300)
    else:  # another model's state under this entry's name
        shutil.copyfile(foreign, path)


@pytest.mark.parametrize("how", ["garbage", "truncated", "foreign", "index"])
def test_a_bad_state_file_is_removed_with_a_warning(
    lively, tiny_model, cold, tmp_path, how, caplog
):
    messages = conversation("Name a fox.")
    with service(tiny_model, tmp_path / "other") as svc:
        ask(svc, messages)
    with service(lively, tmp_path / "c") as svc:
        first = ask(svc, messages)
    path = first_block(tmp_path / "c")  # without it, no later block is reachable
    _damage(path, how, first_block(tmp_path / "other"))
    follow = conversation("Name a fox.", first.text, "Another?")
    with caplog.at_level(logging.WARNING, logger="mlxc.prefix"):
        with service(lively, tmp_path / "c") as svc:
            second = ask(svc, follow)
    assert second.text == cold(lively, follow)
    if how == "index":  # the index is rebuilt from the block files: nothing is lost
        assert "rebuilding" in caplog.text and second.usage.cached_tokens > 100
        return
    assert second.usage.cached_tokens == 0
    assert "removing unusable" in caplog.text
    read_header(path)  # written again, whole, by the follow-up


def test_another_model_never_reuses_a_state(lively, tiny_model, tmp_path):
    messages = conversation("What is MLX?")
    with service(tiny_model, tmp_path) as svc:
        ask(svc, messages)
    theirs = state_files(tmp_path)[0]
    with service(lively, tmp_path) as svc:
        mine = ask(svc, messages)
        assert svc.prefix_stats()["misses"] >= 1
    assert mine.usage.cached_tokens == 0
    assert theirs.exists()  # still there for its own model


def test_a_block_cut_from_a_freshly_filled_buffer_owns_contiguous_bytes():
    """A prefill chunk that fills a whole fresh KV buffer leaves the attention's transposed
    layout in the cache (MLX keeps the update's strides); a block cut from it must still be a
    row-contiguous copy of exactly its tokens, or its bytes cannot be written."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    from mlxc.engine.kv.block_kv import cut, nbytes, to_buffers

    layer = KVCache()
    projected = mx.random.normal((1, 512, 2, 16)).transpose(0, 2, 1, 3)  # [B, heads, L, dim]
    layer.update_and_fetch(projected, projected)
    pieces = cut([layer], 256, 512)
    mx.eval(pieces)
    specs, views = to_buffers(pieces)
    assert [s["shape"] for s in specs] == [[1, 2, 256, 16]] * 2
    assert nbytes(pieces) == sum(v.nbytes for v in views) == 2 * 2 * 256 * 16 * 4
    assert mx.array_equal(pieces[0], projected[..., 256:, :])

"""What the prefix cache and the memory measurement leave on disk: folders 0700 and files 0600
whatever the umask (the index's -wal and -shm too), and a disk budget that counts the index's
own files, so the folder never grows past it; processes creating one index at once never take
each other for damage. Real tiny models, real files."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import prefix_helpers as base
from prefix_helpers import TEXT, ask, flush, service

lively, sliding = base.lively, base.sliding  # the same fixtures

_UMASK_000 = textwrap.dedent("""
    import json, os, stat, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    os.umask(0)
    from prefix_helpers import ask, conversation, service

    def modes(root):
        found = {{".": stat.S_IMODE(os.stat(root).st_mode)}}
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                path = os.path.join(folder, name)
                found[os.path.relpath(path, root)] = stat.S_IMODE(os.lstat(path).st_mode)
        return found

    out = {{}}
    for kind, model in (("blocks", {lively!r}), ("states", {sliding!r})):
        cache = Path({cache!r}) / kind
        with service(Path(model), cache) as svc:
            ask(svc, conversation("Why?"), max_tokens=2)
            svc.engine().prompt_cache.flush()
            # while it runs: SQLite removes -wal and -shm when the last connection closes
            out[kind] = {{"prefix": modes(cache / "prefix"), "measured": modes(cache / "measured")}}
    print(json.dumps(out))
""")


def test_folders_are_0700_and_files_0600_under_umask_000(lively, sliding, tmp_path):
    script = _UMASK_000.format(tests=str(Path(__file__).parent), lively=str(lively),
                               sliding=str(sliding), cache=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    for kind, folders in found.items():
        for folder, modes in folders.items():
            wrong = {}
            for name, mode in modes.items():
                is_dir = (tmp_path / kind / folder / name).is_dir()
                if mode != (0o700 if is_dir else 0o600):
                    wrong[name] = oct(mode)
            assert not wrong, (kind, folder, wrong)
        prefix = set(folders["prefix"])
        assert {"index.sqlite", "index.sqlite-wal", "index.sqlite-shm"} <= prefix
        assert any(n.endswith(".json") for n in folders["measured"])  # it measured
    assert any(n.endswith(".kvb") for n in found["blocks"]["prefix"])
    assert any(n.endswith(".safetensors") for n in found["states"]["prefix"])


def _folder_bytes(prefix: Path) -> int:
    """Everything under the prefix folder (index, WAL, blocks, temporary files), taken while no
    writer can reserve room (the index's write lock)."""
    db = sqlite3.connect(prefix / "index.sqlite", timeout=30, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        total = 0
        for folder, _, files in os.walk(prefix):
            for name in files:
                try:
                    total += os.stat(os.path.join(folder, name)).st_size
                except FileNotFoundError:  # renamed or evicted during the walk
                    pass
        db.execute("COMMIT")
    finally:
        db.close()
    return total


def test_the_disk_budget_counts_the_index(lively, tmp_path):
    """The folder, index included, stays within the budget with no slack: a reservation keeps
    room for the index's growth until the next one (kv/block_index.py's INDEX_GROWTH)."""
    budget = 1_000_000
    prefix = tmp_path / "prefix"
    peak, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            if (prefix / "index.sqlite").exists():
                peak[0] = max(peak[0], _folder_bytes(prefix))
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with service(lively, tmp_path, prefix_block_tokens=32, prefix_disk_bytes=budget) as svc:
            for i in range(60):
                ask(svc, prompt=f"{i} {TEXT}"[: 200 + 7 * (i % 40)], max_tokens=2)
                flush(svc)
                peak[0] = max(peak[0], _folder_bytes(prefix))
            stats = svc.prefix_stats()
            blocks = sum(p.stat().st_size for p in (prefix / "blocks").glob("*.kvb"))
    finally:
        stop.set()
        watcher.join()
    assert stats["bytes_written"] > 3 * budget  # so blocks were evicted, many times
    assert budget // 2 < peak[0] <= budget
    assert stats["index_bytes"] > 0 and stats["disk_bytes"] <= budget
    assert stats["disk_bytes"] == blocks + stats["index_bytes"]


_OPENER = textwrap.dedent("""
    import logging, sys, time
    from pathlib import Path
    from mlxc.engine.kv.block_index import BlockIndex
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    start = float(sys.argv[1])
    for i, folder in enumerate(sys.argv[2:]):
        time.sleep(max(0.0, start + 0.3 * i - time.time()))  # all processes at once
        BlockIndex(Path(folder)).close()
""")


def test_processes_opening_a_new_folder_at_once_never_rebuild_its_index(tmp_path):
    """Setting WAL mode, or adding a column, fails at once in a process while another does it
    ("database is locked", "duplicate column"): that is no damage, and rebuilding the index
    then deleted the other's live one (3 processes at once: 37 of 60 fresh folders)."""
    folders = [str(tmp_path / f"p{i}") for i in range(8)]
    start = time.time() + 2.0  # after the interpreters are up
    children = [subprocess.Popen([sys.executable, "-c", _OPENER, str(start), *folders],
                                 stderr=subprocess.PIPE, text=True) for _ in range(3)]
    logs = [child.communicate(timeout=120)[1] for child in children]
    assert all(child.returncode == 0 for child in children), logs
    assert not any("rebuilding" in log for log in logs), logs

"""kill -9 in a loop while processes write the response store: every answer a writer had
acknowledged is still there and readable (data lost: 0), nothing half-written is ever
read, and the store opens cleanly after each crash. Bounded: a few seconds per round."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time

from mlxc.store import DiskStore

ROUNDS = int(os.environ.get("MLXC_CRASH_ROUNDS", "5"))

# A writer: small answers (in the row) and large ones (a value file beside it), each
# acknowledged on stdout only after set() returned.
WRITER = r"""
import os, sys
from mlxc.store import DiskStore
store = DiskStore(sys.argv[1], 1 << 30, "least-recently-used", None)
tag = sys.argv[2]
for i in range(100000):
    big = i % 3 == 0
    text = os.urandom(40_000).hex() if big else f"answer {i}"
    store.set(f"{tag}-{i}", {"text": text, "n": i, "big": big})
    print(f"{tag}-{i}", flush=True)
"""


def test_kill_9_during_writes_loses_no_acknowledged_answer(tmp_path):
    folder = tmp_path / "responses"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    acknowledged: list[str] = []
    rng = random.Random(14)
    for round_ in range(ROUNDS):
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(folder), f"r{round_}w{w}"],
                                    stdout=subprocess.PIPE, text=True, env=env)
                   for w in range(2)]
        time.sleep(0.6 + 0.8 * rng.random())  # start-up, then some writes
        for proc in writers:
            os.kill(proc.pid, signal.SIGKILL)
        for proc in writers:
            out, _ = proc.communicate(timeout=30)
            acknowledged += out.split()
        store = DiskStore(folder, 1 << 30, "least-recently-used", None)  # opens after a crash
        try:
            lost = [k for k in acknowledged if store.get(k) is None]
            assert lost == [], f"round {round_}: {len(lost)} acknowledged answers lost"
            stats = store.stats()
            assert stats.refused_rows == 0  # nothing torn was ever read
        finally:
            store.close()
    assert len(acknowledged) > ROUNDS * 2, "the writers never got going"
    print(f"{ROUNDS} rounds of kill -9: {len(acknowledged)} acknowledged answers, 0 lost")

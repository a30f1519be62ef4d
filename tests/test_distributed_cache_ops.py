"""distributed/cache_ops.py without a world: a real mlx-lm batch (joins, a burst whose prompt
batch splits and is copied, leaves, extracts) runs on one copy of the tiny llama while a
Replica replays its logged cache operations on caches of its own, running each model call of
the first on them; both must compute the same logits at every call, and hold the same rows.
In a subprocess: `install` wraps mlx-lm's cache classes for the whole process."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = r'''
import sys
import mlx.core as mx
from mlx_lm.utils import load_model
from mlxc.distributed.cache_ops import CacheLog, Replica, install, pack, unpack
from mlxc.engine.batch.generator import Batch
from mlx_lm.models.cache import make_prompt_cache

from pathlib import Path
lead, _ = load_model(Path(sys.argv[1]))
mirror, _ = load_model(Path(sys.argv[1]))
log = CacheLog([type(c).__name__ for c in make_prompt_cache(lead)])
install(log)
replica = Replica(mirror)
inner, base = lead.model, type(lead.model)
calls = []

class Checked(base):
    def __call__(self, inputs, cache=None, input_embeddings=None):
        ids = log.name_list(cache)
        assert ids is not None, "a cache the replica does not hold"
        job = {**log.take(), "cache": pack(ids)}
        with log.quiet():  # the replica's own operations: a follower's, never logged there
            replica.apply(job)
            theirs = replica.get(job["cache"])
            assert [c.size() for c in theirs] == [c.size() for c in cache]
            again = mirror.model(inputs, theirs)
        out = base.__call__(self, inputs, cache)
        mx.eval(out, again)
        calls.append(float(mx.abs(out - again).max()))
        return out

inner.__class__ = Checked
step = 16  # small prefill passes: prompts of different lengths finish apart (a split)
batch = Batch(lead, completion_batch_size=4, prefill_batch_size=4, prefill_step_size=step)
prompts = [list(range(5, 5 + n)) for n in (3, 40, 9, 25)]
batch.insert(prompts[:1], max_tokens=[30])
for _ in range(3):
    batch.next()
batch.insert(prompts[1:], max_tokens=[4, 12, 20])  # a burst joins the running one
done, steps = 0, 0
while done < 4 and steps < 200:
    steps += 1
    _, responses = batch.next()
    done += sum(r.finish_reason is not None for r in responses)
    if steps == 8:
        left = [r.uid for r in responses if r.finish_reason is None][:1]
        batch.remove(left, return_prompt_caches=True)
        done += len(left)
batch.close()
assert max(calls) == 0.0, max(calls)
print("calls", len(calls), "ops", dict(log.counts))
'''


def test_a_replica_replays_the_batch_and_computes_the_same(tiny_model: Path):
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_model)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    print(done.stdout)
    ops = done.stdout.split("ops", 1)[1]
    for name in ("merge", "filter", "extend", "extract", "copy", "prepare", "finalize"):
        assert f"'{name}'" in ops, done.stdout

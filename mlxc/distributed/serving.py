"""This process's part in `mlxc serve --distributed`: rank 0 serves HTTP with the ordinary
engine, whose model is loaded as its shard and leads (lockstep.py); every other rank loads its
shard the same way and follows until rank 0 stops. Importing this module imports no MLX."""

from __future__ import annotations

import fcntl
import os
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlxc.distributed.world import World


@dataclass
class Role:
    group: Any
    world: World
    parallel: str  # as asked: tensor | pipeline | auto
    layout: str = ""  # as loaded: tensor | pipeline
    leader: Any = None  # rank 0's lockstep.Leader, once the model is loaded
    hosts: list[str] = field(default_factory=list)
    watch: Any = None  # watch.py: rank 0's Watcher, a follower's Link (None alone)
    engine: Any = None  # rank 0's engine, failed at once when a rank is lost
    lost: str = ""  # why the server stops, once a rank is gone

    def describe(self) -> dict[str, Any]:
        """For /health: the world, and how the model is split over it."""
        watched = getattr(self.watch, "connected", None)
        return {"ranks": self.world.size, "rank": self.world.rank, "hosts": self.hosts,
                "backend": self.world.backend, "parallel": self.layout or self.parallel,
                "mirrored_calls": self.leader.calls if self.leader else 0,
                "mirrored_cache_ops": dict(self.leader.log.counts) if self.leader else {},
                **({"watched_ranks": sorted(watched)} if watched is not None else {}),
                **({"lost": self.lost} if self.lost else {})}


ROLE: Role | None = None  # set by `join_world` before the engine loads; None: not sharded


def join_world(parallel: str) -> Role:
    """Join the `mx.distributed` world the launcher made (mlx.launch or --shards)."""
    global ROLE
    from mlxc.model.blas import load_optimised_blas

    load_optimised_blas()  # before the first `import mlx.core`
    from mlxc.distributed.world import join

    group, world = join()
    hosts = [world.host]
    if world.size > 1:  # every rank's host name, gathered for /health (rank 0 keeps them)
        hosts = [share_from(group, r, world.host) for r in range(world.size)]
    ROLE = Role(group, world, parallel, hosts=hosts)
    from mlxc.distributed.watch import open_watch

    ROLE.watch = open_watch(group, world.rank, world.size, share_from)
    return ROLE


DRAIN_WAIT = 3.0  # s the failed requests' responses have to be written before the exit
FLUSH_WAIT = 3.0  # s the prefix cache's queued disk writes have, then


def serve_watched(role: Role, engine: Any) -> None:
    """Rank 0: a lost rank fails `engine`'s requests at once and ends this process."""
    role.engine = engine
    if role.watch is not None:
        role.watch.on_lost = lambda rank, reason: fail_and_exit(role, rank, reason)


def fail_and_exit(role: Role, rank: int | None, reason: str) -> None:
    """A rank is gone (watcher thread): the engine thread may be stuck in a collective for
    ever, so every request in flight or queued is answered 503 from here, later ones too, and
    once their responses are out (bounded), the prefix cache's queued blocks written
    (bounded), the process exits 1 without waiting for the stuck thread."""
    from mlxc.distributed.lockstep import RankLost

    size = role.world.size
    who = (f"rank {rank} of {size} ({role.hosts[rank] if rank < len(role.hosts) else '?'})"
           if rank is not None else "a rank")
    role.lost = (f"{who} of the sharded model is gone ({reason}); the model is incomplete "
                 "without it, so the server stops: restart every rank")
    print(f"mlxc: {role.lost}; answering the requests in flight with 503", file=sys.stderr,
          flush=True)
    if role.leader is not None:
        role.leader.stopped = True  # nothing more is shared: that would wait for ever
    engine = role.engine
    generations = engine.fail(RankLost(role.lost)) if engine is not None else []
    if role.leader is not None:  # after fail: the engine thread's error is then expected
        role.leader.named(role.lost)
    deadline = time.monotonic() + DRAIN_WAIT
    while time.monotonic() < deadline and any(g.subscribers for g in generations):
        time.sleep(0.05)
    time.sleep(0.3)  # the last bytes of those responses leave the event loop
    prefix = getattr(engine, "prompt_cache", None)
    if prefix is not None:  # the disk writer is its own thread: no MLX is needed
        flushing = threading.Thread(target=prefix.flush, daemon=True)
        flushing.start()
        flushing.join(FLUSH_WAIT)
    print("mlxc: rank 0 stops (exit 1)", file=sys.stderr, flush=True)
    os._exit(1)


def share_from(group: Any, rank: int, value: Any) -> Any:
    """`value` of `rank` on every rank (all_sum of its JSON bytes, zeros from the others)."""
    import json

    import mlx.core as mx

    from mlxc.distributed.mirror import collective_stream

    stream = collective_stream()
    data = json.dumps(value).encode() if group.rank() == rank else b""
    size = mx.distributed.all_sum(mx.array(len(data)), group=group, stream=stream).item()
    mine = mx.array(list(data), dtype=mx.uint8) if data else mx.zeros(size, dtype=mx.uint8)
    got = mx.distributed.all_sum(mine, group=group, stream=stream)
    return json.loads(bytes(memoryview(got)))


@contextmanager
def preparing(folder: Path):
    """One rank at a time fetches or converts a model on a host (ranks on one host share the
    models folder; two conversions at once would race for its name)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def leading_prefix(model: Any, tokenizer: Any, fingerprint: str | None, settings: Any,
                   step: int) -> Any:
    """Rank 0's prefix cache, whose fetches and stores every rank does (prefix.py)."""
    from mlxc.distributed.prefix import LeadingPrefix

    return LeadingPrefix(ROLE, model, tokenizer, fingerprint, settings, step)


def load_leader(folder: Path) -> tuple[Any, Any]:
    """Rank 0's shard (engine thread), its inner network leading the followers."""
    from mlxc.distributed.lockstep import lead
    from mlxc.distributed.shard import load_shard

    role = ROLE
    model, tokenizer, role.layout = load_shard(folder, role.group, role.parallel)
    role.leader = lead(role.group, model)
    if role.watch is not None:  # a failed collective: the same end as a lost connection
        role.leader.on_lost = role.watch.collective_failed
    return model, tokenizer


def run_follower(ref: Any, settings: Any) -> int:
    """A rank other than 0: its shard, loaded as rank 0 loads its own (same dtype), then
    rank 0's model calls until it stops. Returns the exit code."""
    from mlxc.distributed.lockstep import follow
    from mlxc.distributed.prefix import following_prefix
    from mlxc.distributed.shard import load_shard
    from mlxc.engine.worker import DEFAULT_PREFILL_STEP
    from mlxc.model.dtype import apply_dtype, effective_dtype_without_mlx
    from mlxc.model.refs import model_fingerprint, prepare_model

    role = ROLE
    rank = role.world.rank
    with preparing(ref.folder):
        prepare_model(ref, lambda msg: print(f"rank {rank}: {msg}", file=sys.stderr))
    model, tokenizer, role.layout = load_shard(ref.folder, role.group, role.parallel)
    apply_dtype(model, effective_dtype_without_mlx(settings.dtype, ref.folder,
                                                   settings.cache_dir))
    prefix = following_prefix(role, model, tokenizer, model_fingerprint(ref, settings),
                              settings, DEFAULT_PREFILL_STEP)
    print(f"rank {rank} of {role.world.size} ({role.world.host}): {ref.name} loaded, "
          f"{role.layout} parallel; following rank 0", file=sys.stderr, flush=True)
    try:
        calls = follow(role.group, model, prefix)
    finally:
        prefix.close()  # its last blocks written, for the next start
    print(f"rank {rank}: rank 0 stopped after {calls} model calls", file=sys.stderr,
          flush=True)
    return 0

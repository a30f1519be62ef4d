"""Every model call rank 0's engine makes, run on every rank in the same order (mlxc serve
--distributed): rank 0's engine is the unchanged single-process engine, batch included, whose
model's inner network (`model.model`, where mlx-lm's tensor and pipeline parallel collectives
live) shares each call's token ids and KV cache before running it; the other ranks `follow`,
running the same call on their shard with their own cache for it.

Caches are numbered by rank 0, layer by layer (cache_ops.py): a fresh cache gets numbers on
first use and the followers make their own; what mlx-lm's batch does to caches between calls
(merges, pads, filters, extends, extracts, copies) is logged and replayed on every rank before
the next job, so each rank's batch cache holds its shard of the same rows. A call on a cache
the others do not hold is refused on rank 0 before anything is shared (the ranks never fall
out of step), and each follower checks its cache stands where rank 0's does. The prefix
cache's fetches and stores are shared too (distributed/prefix.py): each rank fills and keeps
its own cache for them. Each call is evaluated before it returns, so the collectives of two
calls never interleave with the sharing between them."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from mlxc.distributed.cache_ops import CacheLog, Replica, ident, install, pack
from mlxc.distributed.mirror import share
from mlxc.errors import ModelError

NAMED_WAIT = 2.0  # s the request that found a failed collective waits for the named message


class OutOfStep(ModelError):
    """A model call the other ranks could not repeat; raised before anything was shared."""


class RankLost(ModelError):
    """A peer of the world is gone: the model is incomplete, so the server stops."""


class Leader:
    """Rank 0's side: installed on the model's inner network by `lead`."""

    def __init__(self, group: Any, model: Any) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.group = group
        self.log = CacheLog([type(c).__name__ for c in make_prompt_cache(model)])
        self.calls = 0
        self.stopped = False
        self.on_lost: Any = None  # serving.py: watch.py's end of the server, given a reason
        self.lost_message: str | None = None  # serving.py's, naming the rank that went
        self._named = threading.Event()

    def named(self, message: str) -> None:
        """The server's message for the loss (serving.fail_and_exit): the request that found
        a failed collective gets it too, as every other request does."""
        self.lost_message = message
        self._named.set()

    def before(self, inputs: Any, cache: Any, embeddings: Any) -> None:
        """Share this call with the followers (engine thread), or refuse it first."""
        if embeddings is not None:
            raise OutOfStep("input embeddings are not mirrored to the other ranks")
        job: dict[str, Any] = {"call": inputs.tolist(), "cache": None}
        if cache is not None:
            ids = self.log.name_list(cache)
            if ids is None:
                raise OutOfStep(f"a KV cache the other ranks do not hold ({type(cache[0]).__name__}"
                                ", changed outside the operations they follow): sharded "
                                "serving cannot run this call")
            job["cache"], job["at"] = pack(ids), int(cache[0].size())
        self._send(job)
        self.calls += 1

    def lost(self, exc: Exception) -> None:
        """A collective failed (MLX's ring: 'connection to a peer was lost'): end the server
        as a lost rank does (serving.fail_and_exit, on its own thread), or without a watcher
        with SIGTERM (its usual shutdown), and say why to the request that found it."""
        if not self.stopped:
            self.stopped = True
            if self.on_lost is not None:
                threading.Thread(target=self.on_lost, args=(str(exc),), daemon=True).start()
            else:
                os.kill(os.getpid(), signal.SIGTERM)
        if self.on_lost is not None:
            self._named.wait(NAMED_WAIT)
        raise RankLost(self.lost_message or f"another rank of the sharded model is gone ({exc}); "
                       "the server stops: restart every rank") from exc

    def share_fetch(self, tokens: list[int]) -> int:
        """A prefix lookup every rank does (distributed/prefix.py); its cache's first number."""
        first = self.log.reserve(len(self.log.classes))
        self._send({"fetch": tokens, "key": first})
        return first

    def adopt(self, cache: list[Any], first: int) -> None:
        """`cache` is numbers first.. on every rank."""
        self.log.adopt(cache, first)

    def share_store(self, cache: list[Any], tokens: list[int]) -> bool:
        """Every rank keeps its share of `cache` for `tokens`; False for a cache they lack."""
        ids = [ident(layer) for layer in cache]
        if None in ids:
            return False
        self._send({"store": pack(ids), "tokens": list(tokens)})
        return True

    def _send(self, job: dict) -> None:
        if self.stopped:
            raise RankLost("the other ranks of the sharded model have stopped (see the log); "
                           "restart every rank")
        job.update(self.log.take())
        try:
            share(self.group, job)
        except RuntimeError as exc:
            self.lost(exc)

    def stop(self) -> None:
        """Let the followers return (engine thread, or any thread once the engine is done)."""
        if not self.stopped:
            self.stopped = True
            share(self.group, {"stop": True})


def lead(group: Any, model: Any) -> Leader:
    """Make every call of `model.model` (its inner network) shared first, then evaluated, and
    every cache operation between calls logged for the followers."""
    import mlx.core as mx

    leader = Leader(group, model)
    install(leader.log)
    inner = model.model
    base = type(inner)

    class Lockstep(base):  # the same module, its parameters untouched: only the call wraps
        def __call__(self, inputs, cache=None, input_embeddings=None, **kwargs):
            leader.before(inputs, cache, input_embeddings)
            try:
                out = base.__call__(self, inputs, cache, input_embeddings, **kwargs)
                mx.eval(out)  # its collectives now, before the next share
            except RuntimeError as exc:
                leader.lost(exc)
            return out

    Lockstep.__name__ = Lockstep.__qualname__ = base.__name__
    inner.__class__ = Lockstep
    return leader


def follow(group: Any, model: Any, prefix: Any = None) -> int:
    """A follower rank's loop: run rank 0's model calls and cache operations, and its prefix
    cache's fetches and stores on `prefix` (this rank's own), until it stops; returns the
    model calls run. A cache out of step with rank 0's is a clear error (the rank ends, and
    with it the server) rather than an answer from wrong positions."""
    import mlx.core as mx

    inner, replica, calls = model.model, Replica(model), 0
    while True:
        job = share(group)
        replica.apply(job)  # rank 0's cache operations since the last job, then its frees
        if job.get("stop"):
            return calls
        if "fetch" in job:  # distributed/prefix.py: this rank's blocks, agreed with the others
            from mlxc.distributed.prefix import agree, settle
            from mlxc.engine.kv.blocks import token_array

            found, reused, _ = prefix.tiers.reuse(token_array(job["fetch"]))
            replica.adopt(settle(model, found, reused, agree(group, reused)), job["key"])
            continue
        if "store" in job:
            prefix.store(job["tokens"], replica.get(job["store"]))
            continue
        cache = None
        if job["cache"] is not None:
            cache = replica.get(job["cache"])
            mine = int(cache[0].size())
            if mine != job["at"]:
                raise OutOfStep(f"rank {group.rank()}: a KV cache holds {mine} tokens, "
                                f"rank 0's {job['at']}")
        out = inner(mx.array(job["call"]), cache)
        mx.eval(out)
        calls += 1
        if calls % 256 == 0:
            mx.clear_cache()

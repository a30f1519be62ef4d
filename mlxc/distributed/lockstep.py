"""Every model call rank 0's engine makes, run on every rank in the same order (mlxc serve
--distributed): rank 0's engine is the unchanged single-process engine, whose model's inner
network (`model.model`, where mlx-lm's tensor and pipeline parallel collectives live) shares
each call's token ids and KV cache before running it; the other ranks `follow`, running the
same call on their shard with their own cache for it.

Caches are named by rank 0: a fresh (empty) cache gets a number on first use, the followers
make their own fresh one for it, and drop it when rank 0's is garbage collected. A cache
changed outside a model call (trimmed, merged into a batch, filled from the prefix cache)
could not be followed, so rank 0 refuses such a call before sharing anything (the ranks stay
in step) and `mlxc serve --distributed` turns off what would do it: batching past one sequence,
speculation. The prefix cache's fetches and stores are shared too (distributed/prefix.py): each
rank fills and keeps its own cache for them. Each call is evaluated before it returns, so the
collectives of two calls never interleave with the sharing between them."""

from __future__ import annotations

import os
import signal
import weakref
from typing import Any

from mlxc.distributed.mirror import share
from mlxc.errors import ModelError


class OutOfStep(ModelError):
    """A model call the other ranks could not repeat; raised before anything was shared."""


class RankLost(ModelError):
    """A peer of the world is gone: the model is incomplete, so the server stops."""


class Leader:
    """Rank 0's side: installed on the model's inner network by `lead`."""

    def __init__(self, group: Any, model: Any) -> None:
        from mlx_lm.models.cache import make_prompt_cache

        self.group = group
        self.classes = [type(c).__name__ for c in make_prompt_cache(model)]
        self.calls = 0
        self._next = 0
        self._freed: list[int] = []  # appended by GC finalizers, sent with the next call
        self._offsets: dict[int, int] = {}  # where each named cache stood after its last call
        self.stopped = False

    def before(self, inputs: Any, cache: Any, embeddings: Any) -> None:
        """Share this call with the followers (engine thread), or refuse it first."""
        if embeddings is not None:
            raise OutOfStep("input embeddings are not mirrored to the other ranks")
        key = offset = None
        if cache is not None:
            key, offset = self._name(cache)
        self._send({"call": inputs.tolist(), "cache": key, "offset": offset})
        if key is not None:
            self._offsets[key] = offset + int(inputs.shape[1])
        self.calls += 1

    def lost(self, exc: Exception) -> None:
        """A collective failed (MLX's ring: 'connection to a peer was lost'): stop the server
        (SIGTERM: its usual shutdown) and say why to the request that found it."""
        if not self.stopped:
            self.stopped = True
            os.kill(os.getpid(), signal.SIGTERM)
        raise RankLost(f"another rank of the sharded model is gone ({exc}); the server stops: "
                       "restart every rank") from exc

    def _name(self, cache: list[Any]) -> tuple[int, int]:
        """(number, offset) of a cache the followers know or can make fresh."""
        first = cache[0]
        offset = getattr(first, "offset", 0)
        key = getattr(first, "_mlxc_lockstep", None)
        if key is not None:
            if self._offsets.get(key) != offset:
                raise OutOfStep(f"a KV cache was changed outside a model call (at {offset}, "
                                f"the other ranks at {self._offsets.get(key)}): "
                                "sharded serving cannot follow it")
            return key, offset
        classes = [type(c).__name__ for c in cache]
        if classes != self.classes or not all(_empty(c) for c in cache):
            raise OutOfStep(f"a KV cache the other ranks cannot make ({classes[0]}, "
                            f"{'filled' if classes == self.classes else 'not fresh'}): "
                            "sharded serving runs one sequence at a time")
        key, self._next = self._next, self._next + 1
        first._mlxc_lockstep = key
        weakref.finalize(first, self._forget, key)
        return key, 0

    def share_fetch(self, tokens: list[int]) -> int:
        """A prefix lookup every rank does (distributed/prefix.py); the cache's number."""
        key, self._next = self._next, self._next + 1
        self._send({"fetch": tokens, "key": key})
        return key

    def adopt(self, cache: list[Any], key: int, offset: int) -> None:
        """`cache` (holding `offset` tokens) is number `key` on every rank."""
        cache[0]._mlxc_lockstep = key
        self._offsets[key] = offset
        weakref.finalize(cache[0], self._forget, key)

    def share_store(self, cache: list[Any], tokens: list[int]) -> bool:
        """Every rank keeps its share of `cache` for `tokens`; False for a cache they lack."""
        key = getattr(cache[0], "_mlxc_lockstep", None)
        if key is None or self._offsets.get(key) != getattr(cache[0], "offset", None):
            return False
        self._send({"store": key, "tokens": list(tokens)})
        return True

    def moved(self, cache: list[Any]) -> None:
        """`cache` was cut on every rank alike (a store trims past its tokens)."""
        key = getattr(cache[0], "_mlxc_lockstep", None)
        if key in self._offsets:
            self._offsets[key] = int(cache[0].offset)

    def _send(self, job: dict) -> None:
        if self.stopped:
            raise RankLost("the other ranks of the sharded model have stopped (see the log); "
                           "restart every rank")
        if self._freed:
            job["free"], self._freed = self._freed, []
        try:
            share(self.group, job)
        except RuntimeError as exc:
            self.lost(exc)

    def _forget(self, key: int) -> None:
        self._offsets.pop(key, None)
        self._freed.append(key)

    def stop(self) -> None:
        """Let the followers return (engine thread, or any thread once the engine is done)."""
        if not self.stopped:
            self.stopped = True
            share(self.group, {"stop": True})


def _empty(cache: Any) -> bool:
    try:
        return bool(cache.empty())
    except NotImplementedError:
        return False


def lead(group: Any, model: Any) -> Leader:
    """Make every call of `model.model` (its inner network) shared first, then evaluated."""
    import mlx.core as mx

    leader = Leader(group, model)
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
    """A follower rank's loop: run rank 0's model calls, and its prefix cache's fetches and
    stores on `prefix` (this rank's own), until it stops; returns the model calls run.
    A cache out of step with rank 0's is a clear error (the rank ends, and with it the server)
    rather than an answer from wrong positions."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    inner, caches, calls = model.model, {}, 0
    while True:
        job = share(group)
        for key in job.get("free", ()):
            caches.pop(key, None)
        if job.get("stop"):
            return calls
        if "fetch" in job:  # distributed/prefix.py: this rank's blocks, agreed with the others
            from mlxc.distributed.prefix import agree, settle
            from mlxc.engine.kv.blocks import token_array

            found, reused, _ = prefix.tiers.reuse(token_array(job["fetch"]))
            caches[job["key"]] = settle(model, found, reused, agree(group, reused))
            continue
        if "store" in job:
            prefix.store(job["tokens"], caches[job["store"]])
            continue
        key, cache = job["cache"], None
        if key is not None:
            cache = caches.get(key)
            if cache is None:
                cache = caches[key] = make_prompt_cache(model)
            mine = getattr(cache[0], "offset", 0)
            if mine != job["offset"]:
                raise OutOfStep(f"rank {group.rank()}: KV cache {key} holds {mine} tokens, "
                                f"rank 0's {job['offset']}")
        out = inner(mx.array(job["call"]), cache)
        mx.eval(out)
        calls += 1
        if calls % 256 == 0:
            mx.clear_cache()

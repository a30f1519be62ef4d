"""The KV cache operations rank 0 does between model calls, done by every rank: what lets a
sharded server batch. mlx-lm's `BatchGenerator` merges sequences' caches into a batch cache,
pads and rolls it, filters rows out, extends it with another, extracts a row, copies it;
each rank's cache holds its shard's heads (or layers) of the same tokens, so each must do
the same steps on its own.

Every cache layer rank 0's followers hold has a number (`_mlxc_id` on rank 0's object, the
followers' dict key). On rank 0 those operations of mlx-lm's cache classes are wrapped
(`install`): each appends itself to a log, sent with the next shared job (a model call, a
prefix fetch or store) and replayed there before it. An operation on a layer the followers
do not hold leaves its result unnumbered; a model call on it is refused (lockstep.py), so the
ranks never diverge silently. Numbers are never reused; a layer rank 0 drops (GC) is dropped
by the followers with the next job."""

from __future__ import annotations

import copy
import threading
import weakref
from collections import Counter, deque
from contextlib import contextmanager
from typing import Any

ATTR = "_mlxc_id"


def pack(ids: list[int]) -> list[int]:
    """Numbers as (start, step, count) triples: a batch's 30 layers are mostly one run."""
    out: list[int] = []
    i = 0
    while i < len(ids):
        step = ids[i + 1] - ids[i] if i + 1 < len(ids) else 1
        n = 1
        while i + n < len(ids) and ids[i + n] - ids[i + n - 1] == step:
            n += 1
        out += [ids[i], step, n]
        i += n
    return out


def unpack(packed: list[int]) -> list[int]:
    return [start + step * k for start, step, n in zip(packed[::3], packed[1::3],
                                                      packed[2::3], strict=True)
            for k in range(n)]


def ident(layer: Any) -> int | None:
    return getattr(layer, ATTR, None)


class CacheLog:
    """Rank 0's numbering of cache layers, and the operations on them since the last job."""

    def __init__(self, classes: list[str]) -> None:
        self.classes = classes  # the model's fresh cache, layer by layer
        self._lock = threading.Lock()
        self._next = 0
        self._fresh: list[list] = []  # [kind, first, count, *window]: layers the others make
        self._ops: list[list] = []  # [name, arg, columns of numbers]
        self._freed: deque[int] = deque()  # appended by GC finalizers, from any thread
        self._quiet = 0
        self.counts: Counter = Counter()  # operations mirrored, by name (for /health)

    @contextmanager
    def quiet(self):
        """Operations every rank does anyway (inside a shared prefix fetch or store)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def reserve(self, n: int) -> int:
        with self._lock:
            first, self._next = self._next, self._next + n
        return first

    def adopt(self, layers: list[Any], first: int) -> None:
        """`layers` are numbers first.. on every rank (a shared fetch made them)."""
        for k, layer in enumerate(layers):
            self._number(layer, first + k)

    def _number(self, layer: Any, key: int) -> None:
        setattr(layer, ATTR, key)
        weakref.finalize(layer, self._freed.append, key)

    def name_list(self, cache: list[Any]) -> list[int] | None:
        """The numbers of a cache's layers; a fresh cache is numbered (the others make one
        too); None for one the others do not hold."""
        ids = [ident(layer) for layer in cache]
        if all(key is not None for key in ids):
            return ids
        if any(key is not None for key in ids) or [type(c).__name__ for c in cache] != \
                self.classes or not all(_empty(c) for c in cache):
            return None
        first = self.reserve(len(cache))
        self.adopt(cache, first)
        with self._lock:
            self._fresh.append(["list", first, len(cache)])
        return list(range(first, first + len(cache)))

    def _known(self, layer: Any) -> int | None:
        """A layer's number; an empty KVCache or RotatingKVCache nobody numbered yet gets one
        (the others make their own: a window's size and kept tokens ride along)."""
        key = ident(layer)
        kind = type(layer).__name__
        if key is None and kind in ("KVCache", "RotatingKVCache") and _empty(layer):
            fresh = ["kv"] if kind == "KVCache" else ["window", layer.max_size, layer.keep]
            key = self.reserve(1)
            self._number(layer, key)
            with self._lock:
                last = self._fresh[-1] if self._fresh else None
                if last and [last[0], *last[3:]] == fresh and last[1] + last[2] == key:
                    last[2] += 1
                else:
                    self._fresh.append([fresh[0], key, 1, *fresh[1:]])
        return key

    def did(self, name: str, arg: Any, layer: Any, other: Any = None, made: Any = None) -> None:
        """`layer` (with `other`) had `name` done to it, making `made`: the others do it too.
        If they could not (a layer they lack), `layer` and `made` are theirs no more."""
        if self._quiet:
            return
        key = ident(layer)
        if key is None:
            return  # a layer only rank 0 has: nothing to follow
        row = [key]
        if other is not None:
            row.append(self._known(other))
        if made is not None:
            row.append(self.reserve(1))
        if None in row:
            delattr(layer, ATTR)  # its GC finalizer still frees the others' copy
            return
        if made is not None:
            self._number(made, row[-1])
        self._record(name, arg, row)

    def merged(self, made: Any, layers: list[Any]) -> None:
        """`made` = merge(layers): the batch cache of several sequences' layers."""
        if self._quiet:
            return
        row = [self._known(layer) for layer in layers]
        if None in row:
            return
        key = self.reserve(1)
        self._number(made, key)
        self._record("merge", len(row), [key, *row])

    def _record(self, name: str, arg: Any, row: list[int]) -> None:
        self.counts[name] += 1
        with self._lock:
            last = self._ops[-1] if self._ops else None
            if last and last[0] == name and last[1] == arg and len(last[2]) == len(row):
                for column, key in zip(last[2], row, strict=True):
                    column.append(key)
            else:
                self._ops.append([name, arg, [[key] for key in row]])

    def take(self) -> dict:
        """What the others must do before the next job: {} when nothing."""
        out: dict[str, Any] = {}
        with self._lock:
            if self._fresh:
                out["fresh"], self._fresh = self._fresh, []
            if self._ops:
                out["ops"] = [[n, a, [pack(c) for c in cols]] for n, a, cols in self._ops]
                self._ops = []
        freed = []
        while self._freed:
            freed.append(self._freed.popleft())
        if freed:
            out["free"] = pack(sorted(freed))
        return out


def _empty(layer: Any) -> bool:
    try:
        return bool(layer.empty())
    except NotImplementedError:
        return False


def _plain(value: Any) -> Any:
    return value.tolist() if hasattr(value, "tolist") else value


def install(log: CacheLog) -> None:
    """Wrap mlx-lm's cache classes (in this process, rank 0's) so their operations outside
    model calls are logged. Once per process; a second install replaces the first's log."""
    from mlx_lm.generate import BatchGenerator
    from mlx_lm.models import cache as kv

    global _LOG
    first, _LOG = _LOG is None, log
    if not first:
        return

    def inplace(cls: type, name: str, arg_of) -> None:
        base = cls.__dict__[name]

        def op(self, *args, **kwargs):
            out = base(self, *args, **kwargs)
            _LOG.did(name, arg_of(*args, **kwargs), self)
            return out
        setattr(cls, name, op)

    def making(cls: type, name: str) -> None:
        base = cls.__dict__[name]

        def op(self, idx):
            made = base(self, idx)
            _LOG.did(name, int(idx), self, made=made)
            return made
        setattr(cls, name, op)

    def extending(cls: type) -> None:
        base = cls.__dict__["extend"]

        def extend(self, other):
            base(self, other)
            _LOG.did("extend", None, self, other=other)
        cls.extend = extend

    def merging(cls: type) -> None:
        base = cls.__dict__["merge"].__func__

        def merge(klass, caches):
            made = base(klass, caches)
            _LOG.merged(made, caches)
            return made
        cls.merge = classmethod(merge)

    def copying(cls: type) -> None:
        def deep(self, memo):
            made = type(self).__new__(type(self))
            memo[id(self)] = made
            for k, v in self.__dict__.items():
                if k != ATTR:
                    setattr(made, k, copy.deepcopy(v, memo))
            _LOG.did("copy", None, self, made=made)
            return made
        cls.__deepcopy__ = deep

    for cls in (kv.KVCache, kv.RotatingKVCache, kv.BatchKVCache, kv.BatchRotatingKVCache):
        inplace(cls, "trim", lambda n: int(n))
        copying(cls)
    for cls in (kv.BatchKVCache, kv.BatchRotatingKVCache):
        inplace(cls, "filter", lambda keep: [int(i) for i in _plain(keep)])
        inplace(cls, "prepare", lambda **kw: {k: _plain(v) for k, v in kw.items()
                                               if v is not None})
        inplace(cls, "finalize", lambda: None)
        making(cls, "extract")
        extending(cls)
        merging(cls)

    base_insert = BatchGenerator.insert_segments

    def insert_segments(self, segments, max_tokens=None, caches=None, *args, **kwargs):
        for cache in caches or ():  # whole fresh caches numbered at once: fewer, longer runs
            if cache is not None:
                _LOG.name_list(cache)
        return base_insert(self, segments, max_tokens, caches, *args, **kwargs)
    BatchGenerator.insert_segments = insert_segments


_LOG: CacheLog | None = None


class Replica:
    """A follower's cache layers by rank 0's numbers, and the replay of rank 0's log."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.layers: dict[int, Any] = {}

    def apply(self, job: dict) -> None:
        from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

        for kind, first, n, *window in job.get("fresh", ()):
            made = (make_prompt_cache(self.model) if kind == "list"
                    else [KVCache() for _ in range(n)] if kind == "kv"
                    else [RotatingKVCache(*window) for _ in range(n)])
            for k, layer in enumerate(made):
                self.layers[first + k] = layer
        for name, arg, columns in job.get("ops", ()):
            for row in zip(*[unpack(c) for c in columns], strict=True):
                self._replay(name, arg, row)
        for key in unpack(job.get("free", [])):  # after the ops: those came before the frees
            self.layers.pop(key, None)

    def _replay(self, name: str, arg: Any, row: tuple[int, ...]) -> None:
        layers = self.layers
        if name == "merge":
            sources = [layers[k] for k in row[1:]]
            layers[row[0]] = type(sources[0]).merge(sources)
        elif name == "extract":
            layers[row[1]] = layers[row[0]].extract(arg)
        elif name == "copy":
            layers[row[1]] = copy.deepcopy(layers[row[0]])
        elif name == "extend":
            layers[row[0]].extend(layers[row[1]])
        elif name == "prepare":
            layers[row[0]].prepare(**arg)
        elif name == "finalize":
            layers[row[0]].finalize()
        else:  # filter, trim
            getattr(layers[row[0]], name)(arg)

    def adopt(self, layers: list[Any], first: int) -> None:
        for k, layer in enumerate(layers):
            self.layers[first + k] = layer

    def get(self, packed: list[int]) -> list[Any]:
        return [self.layers[k] for k in unpack(packed)]

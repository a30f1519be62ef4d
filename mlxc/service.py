"""The one place where the cache decision is made: request -> key -> stored answer, or a
generation on the engine (run once for identical requests in flight) that is stored when it
finishes. Every front end (ask, serve, warm, bench) goes through `Service.start`.

The hit path imports no MLX: the engine is created only on the first miss.
"""

from __future__ import annotations

import contextlib
import re
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mlxc.config import Settings
from mlxc.model.refs import ModelRef, model_fingerprint, prepare_model, resolve_model
from mlxc.request import Answer, GenerationRequest
from mlxc.store import open_store, private_folders
from mlxc.store_guard import GuardedStore
from mlxc.stream import Delta, Event, Finished, Generation

# A replayed hit is re-chunked into a few words per event, as a live stream would be.
_REPLAY_CHUNK = re.compile(r"\s*\S+(?:\s+\S+){0,2}\s*|\s+")


@dataclass
class Reply:
    """What a front end gets back: a stored answer (hit) or a live generation (miss/bypass)."""

    status: str  # "hit" | "miss" | "bypass"
    key: str | None
    answer: Answer | None = None
    generation: Generation | None = None
    shared: bool = False  # joined an identical generation already in flight
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def cached(self) -> bool:
        return self.status == "hit"

    def events(self, heartbeat: float | None = None) -> Iterator[Event | None]:
        if self.answer is not None:
            yield from replay(self.answer)
        else:
            yield from self.generation.events(heartbeat)

    async def aevents(self, keepalive: float | None = None) -> AsyncIterator[Event | None]:
        if self.answer is not None:
            for event in replay(self.answer):
                yield event
        else:
            async for event in self.generation.aevents(keepalive):
                yield event

    def result(self) -> Answer:
        return self.answer if self.answer is not None else self.generation.result()


def replay(answer: Answer) -> Iterator[Event]:
    """A stored answer as a stream: the same text, in word-sized pieces, then the end (with
    log-probabilities, in one piece: they belong to tokens, not to words)."""
    if answer.logprobs is not None:
        yield Delta(answer.text, answer.logprobs)
        yield Finished(answer)
        return
    for piece in _REPLAY_CHUNK.findall(answer.text):
        yield Delta(piece)
    yield Finished(answer)


class Service:
    """Thread-safe; one per process. Owns the store and (lazily) the engine."""

    def __init__(
        self,
        settings: Settings,
        model: str | None = None,
        progress: Callable[[str], None] | None = None,
        engine_options: dict[str, Any] | None = None,
        store: GuardedStore | None = None,
        before_start: Callable[[Service], None] | None = None,
    ) -> None:
        """`store`: one shared with other services (several models behind one server);
        `before_start(self)` runs before the engine starts (the model pool makes room)."""
        self.settings = settings
        with contextlib.suppress(OSError):  # 0700 before the engine writes (harden);
            private_folders(settings)  # an unwritable folder is reported by open_store
        self.ref: ModelRef = resolve_model(model or settings.model, settings)
        self.progress = progress or (lambda _msg: None)
        self._engine_options = engine_options or {}
        self._before_start = before_start
        # Opened on first use; a full disk or a Redis gone is "degraded", not an error.
        self._owns_store = store is None
        self._store = store or GuardedStore(lambda: open_store(settings))
        self._engine = None
        self._fingerprint: str | None = None
        self._inflight: dict[str, Generation] = {}
        self._lock = threading.Lock()
        self._engine_lock = threading.Lock()  # held while a model converts: not self._lock

    # -- parts, made on first use --------------------------------------------------------

    @property
    def store(self) -> GuardedStore:
        return self._store

    @property
    def fingerprint(self) -> str | None:
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.ref, self.settings)
        return self._fingerprint

    @property
    def engine_started(self) -> bool:
        return self._engine is not None

    def engine(self):
        """The engine, started (model prepared and loading) on first call."""
        with self._engine_lock:
            if self._engine is None:
                from mlxc.engine.worker import Engine

                prepare_model(self.ref, self.progress)
                if self._before_start is not None:
                    self._before_start(self)
                self._engine = Engine(
                    self.ref, self.settings, self.progress, **self._engine_options
                ).start()
            return self._engine

    # -- the cache decision ----------------------------------------------------------------

    def is_cacheable(self, request: GenerationRequest) -> bool:
        policy = self.settings.cache_policy
        return policy == "all" or (policy == "deterministic" and request.is_deterministic)

    def key_for(self, request: GenerationRequest) -> str:
        """The request's cache key; prepares the model first if it is not on disk yet."""
        if self.fingerprint is None:
            prepare_model(self.ref, self.progress)
        return request.cache_key(self.fingerprint)

    def lookup(self, key: str, count_miss: bool = True) -> Answer | None:
        """The stored answer, counted as a hit (or a miss); None if absent or unreadable."""
        value = self.store.get(key, count_miss)
        if value is None:
            return None
        try:
            return Answer.model_validate(value)
        except ValueError:
            return None  # a foreign or older entry: regenerate rather than fail

    def hit(self, request: GenerationRequest, read: bool = True) -> Reply | None:
        """The stored answer if there is one, touching neither the engine nor the model (the
        server asks this on its hit threads first); None: `start` decides, as it would have."""
        if not read or not self.is_cacheable(request) or self.store.degraded is not None:
            return None
        if self._fingerprint is None:
            return None  # the model is not prepared yet: that is start's work
        key = request.cache_key(self._fingerprint)
        # One read: a miss is not counted here but by `start`, once the engine has taken it.
        if (answer := self.lookup(key, count_miss=False)) is not None:
            return Reply("hit", key, answer=answer)
        return None

    def start(self, request: GenerationRequest, read: bool = True, write: bool = True) -> Reply:
        """Answer from the store, join an identical generation in flight, or start one."""
        if not self.is_cacheable(request):
            return Reply("bypass", None, generation=self._submit(request))
        key = self.key_for(request)
        # `contains` counts nothing: a miss is counted once the engine has taken the request
        # (below), so one refused with 503 (queue full) is a refusal, not a miss. A degraded
        # store is tried again only by `get`: then it looks up first, as before.
        held = read and (self.store.degraded is not None or self.store.contains(key))
        if held and (answer := self.lookup(key)) is not None:
            return Reply("hit", key, answer=answer)
        # A store that is unavailable (full disk, Redis gone) was not used: a bypass.
        status = "miss" if (read or write) and not self.store.degraded else "bypass"
        while True:
            engine = self.engine()
            with self._lock:
                if engine is not self._engine:
                    continue  # unloaded meanwhile (model pool): load it again
                generation = self._inflight.get(key)
                # An abandoned run is stopping and will not be stored: start afresh instead.
                shared = generation is not None and not generation.cancelled.is_set()
                if not shared:
                    generation = engine.submit(request)  # EngineBusy when the queue is full
                    self._inflight[key] = generation
                break
        try:
            if read and not held:
                self.lookup(key)  # the miss, counted now that it is one (before _finish stores)
        finally:
            if not shared:
                generation.add_done_callback(lambda event: self._finish(key, event, write))
        return Reply(status, key, generation=generation, shared=shared)

    def _submit(self, request: GenerationRequest) -> Generation:
        """Submit to the engine that is current when the request is queued: `unload` checks
        for queued work under the same lock, so nothing is queued on an engine stopping."""
        while True:
            engine = self.engine()
            with self._lock:
                if engine is self._engine:
                    return engine.submit(request)

    def _finish(self, key: str, event: Event, write: bool) -> None:
        with self._lock:
            self._inflight.pop(key, None)
        # Only whole answers are stored: a cancelled or failed run leaves no trace.
        if write and isinstance(event, Finished) and event.answer.finish_reason != "cancelled":
            self.store.set(key, event.answer.model_dump(mode="json"))

    # -- prefix (KV) cache ----------------------------------------------------------------

    def warm_prefix(self, request: GenerationRequest) -> int:
        """Prefill the request's prompt into the prefix cache (memory and disk) without
        generating; returns the number of prompt tokens cached. Blocks until done."""
        def warm(engine) -> int:
            return engine.prompt_cache.warm(engine.encode(request), request)

        return self.engine().call(warm).result()

    def prefix_stats(self) -> dict[str, Any]:
        """Prefix cache figures as a plain dict: hits, misses, tokens reused, bytes per tier.
        Cheap and safe from any thread (an event loop too): no MLX, at most one SQLite read."""
        engine = self._engine
        cache = getattr(engine, "prompt_cache", None) if engine is not None else None
        if cache is not None:
            return cache.stats()
        from mlxc.engine.kv.index import read_stats

        return {
            **read_stats(self.settings.prefix_dir),
            "memory_bytes": 0,
            "memory_entries": 0,
            "memory_limit": self.settings.prefix_memory_bytes,
            "disk_limit": self.settings.prefix_disk_bytes,
            "directory": str(self.settings.prefix_dir),
            "trimmable": None,  # known once the model is loaded
        }

    def unload(self) -> bool:
        """Stop the engine and free its model, if it has nothing queued, running or in
        flight (the model pool's eviction); False if busy. The next request loads it again."""
        with self._engine_lock, self._lock:
            engine = self._engine
            if engine is None or engine.busy or self._inflight:
                return False
            self._engine = None
        _stop(engine)
        return True

    def close(self) -> None:
        if self._engine is not None:
            _stop(self._engine)
            self._engine = None
        if self._owns_store:
            self._store.close()


# What holds a stopped engine's arrays (its KV caches too, through the scheduler).
_ENGINE_ARRAYS = ("model", "batch_model", "batch_kernels", "scheduler", "memory", "prompt_cache")


def _stop(engine: Any) -> None:
    """Stop an engine, its last prefix state written, and let go of its model's memory."""
    import gc

    engine.shutdown(wait=30)  # let the last prefix state reach the disk
    # A stopped engine parks its thread for good (MLX's thread-local teardown must not run
    # at exit), and the parked frame keeps the engine, so its arrays are dropped here.
    if engine._stopped.is_set():  # noqa: SLF001 - nothing runs on it any more
        for name in _ENGINE_ARRAYS:
            setattr(engine, name, None)
    # Free MLX arrays now: left to interpreter exit, their teardown can race MLX's own
    # threads and abort the process ("terminate called without an active...").
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc keeps a thread arena's pages
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)

"""Several models behind one server: one Service (and, once used, one engine thread) per
model, all on one response store; a model is loaded on its first request, and the least
recently used idle one is unloaded first when loading the next would pass `--max-models` or
the memory budget.

- Memory budget: what the device can use (batch/admission.py's `usable_memory`: Metal's
  working set, CUDA's memory, else the RAM) less admission's safety share. A model counts
  its weights as measured once loaded (the arrays' bytes), before that as estimated from its
  files and the dtype it will run in. Each engine's own KV budget is derived as today, from
  the memory left when it loads.
- Only an idle model is unloaded (nothing queued, running or in flight); if every loaded
  model is busy, a load waits up to `BUSY_WAIT` seconds for one, then is a 503.
- Requests for a model that is loading wait on its engine's queue, streams with keep-alives.
- Loads and switches never mix answers: each model's caches are keyed by its fingerprint.

Thread-safe. No MLX at import, nor before a second model is loaded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mlxc.config import Settings
from mlxc.errors import EngineBusy, InputError
from mlxc.server.model_names import ModelNames, served_name, split_model_option
from mlxc.service import Service

log = logging.getLogger("mlxc.server")
BUSY_WAIT = 10.0  # seconds a load waits for a loaded model to go idle
DEFAULT_MAX_MODELS = 3  # loaded at once, as Ollama's default on a CPU


@dataclass
class ServedModel:
    """One model of the pool and its figures."""

    name: str
    service: Service
    last_used: float = 0.0  # time.monotonic() of the last request routed to it
    requests: int = 0
    loads: int = 0
    unloads: int = 0
    load_seconds: float | None = None  # the last load, engine start to loaded
    weights_bytes: int | None = None  # measured once loaded
    _loading_since: float | None = field(default=None, repr=False)

    @property
    def state(self) -> str:
        """unloaded | loading | loaded | error; never waits."""
        engine = self.service._engine  # noqa: SLF001 - read-only look, no start
        if engine is None:
            return "unloaded"
        if engine.loaded:
            return "loaded"
        return "error" if engine._loaded.is_set() else "loading"  # noqa: SLF001


class ModelPool:
    """The models `mlxc serve -m A -m B` serves; the first is the default."""

    def __init__(
        self,
        settings: Settings,
        specs: list[str],
        aliases: tuple[str, ...] = (),
        progress: Callable[[str], None] | None = None,
        engine_options: dict[str, Any] | None = None,
        max_models: int | None = DEFAULT_MAX_MODELS,
        memory_budget: int | None = None,
        services: list[Service] | None = None,
    ) -> None:
        """`services`: already made (one model, as `create_app(service)` gives)."""
        if max_models is not None and max_models < 1:
            raise InputError("--max-models must be at least 1")
        self.max_models = max_models
        self._budget = memory_budget
        self._lock = threading.Lock()
        self.models: list[ServedModel] = []
        if services is not None:
            self.models = [ServedModel(served_name(s.ref), s) for s in services]
        store = None
        for value in specs:
            name, spec = split_model_option(value)
            service = Service(settings, spec, progress, engine_options, store=store,
                              before_start=self._make_room)
            store = service.store
            self.models.append(ServedModel(name or served_name(service.ref), service))
        self._check_unique()
        self.names = ModelNames([m.name for m in self.models],
                                [m.service.ref for m in self.models], aliases)
        self._by_service = {id(m.service): m for m in self.models}

    @classmethod
    def of(cls, service: Service, aliases: tuple[str, ...] = ()) -> ModelPool:
        return cls(service.settings, [], aliases, services=[service], max_models=None)

    def _check_unique(self) -> None:
        seen: dict[str, ServedModel] = {}
        folders: dict[str, ServedModel] = {}
        for model in self.models:
            if (other := seen.get(model.name.lower())) is not None:
                raise InputError(
                    f"two models are named {model.name!r} ({other.service.ref.name} and "
                    f"{model.service.ref.name}); name one with -m NAME=PATH")
            folder = str(model.service.ref.folder.resolve())
            if (other := folders.get(folder)) is not None:
                raise InputError(f"{model.service.ref.name!r} is served twice (as "
                                 f"{other.name!r} and {model.name!r}); pass it once and "
                                 "give it more names with --alias NAME=MODEL")
            seen[model.name.lower()], folders[folder] = model, model

    # -- routing ---------------------------------------------------------------------------

    @property
    def default(self) -> ServedModel:
        return self.models[0]

    def find(self, name: str) -> ServedModel | None:
        index = self.names.find(name)
        return None if index is None else self.models[index]

    def use(self, model: ServedModel) -> Service:
        """The model's service, marked as just used (for the LRU order)."""
        with self._lock:
            model.last_used = time.monotonic()
            model.requests += 1
        return model.service

    # -- loading and unloading ---------------------------------------------------------------

    def _make_room(self, service: Service) -> None:
        """Before `service` starts its engine: unload LRU idle models until it fits."""
        me = self._by_service[id(service)]
        if len(self.models) > 1:
            deadline = time.monotonic() + BUSY_WAIT
            with self._lock:
                while (why := self._over(me)) is not None:
                    if not self._unload_one(me):
                        if time.monotonic() > deadline:
                            raise EngineBusy(
                                f"model {me.name!r} cannot be loaded now: {why}, and every "
                                "loaded model is answering requests; retry shortly",
                                retry_after=5)
                        self._lock.release()  # let requests reach the busy models
                        try:
                            time.sleep(0.1)
                        finally:
                            self._lock.acquire()
        me.loads += 1
        me._loading_since = time.monotonic()
        threading.Thread(target=self._watch_load, args=(me,), daemon=True,
                         name="mlxc-model-load").start()

    def _loaded_others(self, me: ServedModel) -> list[ServedModel]:
        return [m for m in self.models if m is not me and m.service.engine_started]

    def _over(self, me: ServedModel) -> str | None:
        """Why `me` does not fit beside the loaded models, or None if it does."""
        loaded = self._loaded_others(me)
        if not loaded:
            return None  # alone it loads whatever its size, as a single model always did
        if self.max_models is not None and len(loaded) >= self.max_models:
            return f"--max-models is {self.max_models}"
        budget = self.budget()
        held = sum(self.weights(m) for m in loaded)
        if budget and held + self.weights(me) > budget:
            return (f"its weights (~{_gb(self.weights(me))}) beside those loaded "
                    f"({_gb(held)}) would pass the memory budget ({_gb(budget)})")
        return None

    def _unload_one(self, me: ServedModel) -> bool:
        for victim in sorted(self._loaded_others(me), key=lambda m: m.last_used):
            if victim.service.unload():
                victim.unloads += 1
                log.warning("unloaded %s to make room for %s", victim.name, me.name)
                return True
        return False

    def budget(self) -> int:
        """Bytes the models' weights may take together (0: unknown, not checked)."""
        if self._budget is None:
            from mlxc.model.blas import load_optimised_blas

            load_optimised_blas()  # before the first `import mlx.core`, as the engine does
            from mlxc.engine.batch.admission import safety, usable_memory

            usable, _source = usable_memory()
            self._budget = max(usable - safety(usable), 0)
        return self._budget

    def weights(self, model: ServedModel) -> int:
        """The model's weights in memory: measured once loaded, else estimated from files."""
        if model.weights_bytes is not None:
            return model.weights_bytes
        from mlxc.model.dtype import effective_dtype_without_mlx, float32_bytes

        ref, settings = model.service.ref, model.service.settings
        if not ref.is_ready:
            return 0
        dtype = effective_dtype_without_mlx(settings.dtype, ref.folder, settings.cache_dir)
        if dtype in ("float32", "float16", "bfloat16"):  # dequantized: its float size
            return float32_bytes(ref.folder) // (1 if dtype == "float32" else 2)
        return sum(p.stat().st_size for p in ref.folder.glob("*.safetensors"))

    def _watch_load(self, model: ServedModel) -> None:
        """Note the load's time and the weights' bytes once the engine has loaded."""
        with model.service._engine_lock:  # noqa: SLF001 - held until the engine is made
            engine = model.service._engine  # noqa: SLF001
        started = model._loading_since
        if engine is None or started is None:
            return
        try:
            engine.wait_loaded()
        except Exception:
            return  # /health says error; the requests get the load error
        model.load_seconds = round(time.monotonic() - started, 3)
        try:
            from mlx.utils import tree_flatten

            params = tree_flatten(engine.model.parameters())
            model.weights_bytes = sum(int(v.nbytes) for _, v in params)
        except Exception:  # unloaded meanwhile: the estimate stays
            pass

    # -- figures ------------------------------------------------------------------------------

    def figures(self) -> list[dict[str, Any]]:
        """Per model, for /health and /metrics: plain numbers, never waits on an engine."""
        now = time.monotonic()
        rows = []
        for model in self.models:
            engine = model.service._engine  # noqa: SLF001
            rows.append({
                "name": model.name,
                "model": model.service.ref.name,
                "state": model.state,
                "default": model is self.default,
                "fingerprint": model.service._fingerprint,  # noqa: SLF001 - known or None
                "requests": model.requests,
                "loads": model.loads,
                "unloads": model.unloads,
                "load_seconds": model.load_seconds,
                "weights_bytes": model.weights_bytes,
                "idle_seconds": round(now - model.last_used, 1) if model.last_used else None,
                "queue_depth": engine.queue_depth if engine is not None else 0,
                "batch": engine.figures() if engine is not None else None,
            })
        return rows

    def close(self) -> None:
        """Stop every engine, then the shared store (the default's service owns it)."""
        for model in reversed(self.models):
            model.service.close()


def _gb(n: float) -> str:
    return f"{n / (1 << 30):.1f} GB"

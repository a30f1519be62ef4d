"""GET /health (open even with --api-key: monitors and load balancers read it; without the
key it says only whether the model is up) and GET /metrics (behind the key: the guard).
Both answer in milliseconds during a long generation: they read counters, the engine's
queue and the store's statistics (in a worker thread: SQLite may wait on a lock), never the
model."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from mlxc import __version__
from mlxc.server.guard import key_given
from mlxc.server.state import ServerState, get_state

router = APIRouter()
T = TypeVar("T")


async def _in_stats_thread(read: Callable[[ServerState], T], state: ServerState) -> T:
    """`read(state)` on the server's stats thread (SQLite may wait on a lock)."""
    return await asyncio.get_running_loop().run_in_executor(state.stats_thread, read, state)


def _batch_figures(state: ServerState) -> dict[str, Any]:
    """Running and waiting sequences, decode steps by batch size, engine tokens/s."""
    if not state.service.engine_started:
        return {"running": 0, "waiting": 0, "batch_sizes": {}, "tokens_per_second": 0.0}
    return state.service.engine().figures()


def _engine_status(state: ServerState) -> tuple[str, bool, int]:
    """(status, model_loaded, queue depth); never waits for the engine."""
    service = state.service
    if not service.engine_started:
        return "loading", False, 0
    engine = service.engine()  # started: returns at once
    if engine.loaded:
        return "healthy", True, engine.queue_depth
    try:
        engine.wait_loaded(0)  # raises the load error, if loading ended with one
    except Exception:
        return "error", False, engine.queue_depth
    return "loading", False, engine.queue_depth


def _store_stats(state: ServerState) -> dict[str, Any] | None:
    """The response store's figures (SQLite may wait on a lock: call from a worker thread)."""
    try:
        return state.service.store.stats().as_dict()
    except Exception:  # a broken store must not break the health check itself
        return None


def _both_stats(state: ServerState) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The store's and the prefix cache's figures, read in one worker-thread hop: each hop
    waits for the GIL behind the engine thread's Python, so one hop, not two."""
    try:  # the KV prefix cache: reuse across turns and restarts
        prefix = state.service.prefix_stats()
    except Exception:
        prefix = None
    return _store_stats(state), prefix


def _models(state: ServerState) -> list[dict[str, Any]]:
    """Each model served (server/model_pool.py), with its own prefix cache's figures once
    loaded (all models share the folder; each counts its own hits)."""
    rows = state.pool.figures()
    for row, model in zip(rows, state.pool.models, strict=True):
        if row["state"] == "loaded":
            try:
                row["prefix_cache"] = model.service.prefix_stats()
            except Exception:
                row["prefix_cache"] = None
    return rows


def _degraded(state: ServerState, status: str) -> tuple[str, dict[str, str]]:
    """A healthy server whose cache is off for now (a full disk, Redis gone) is `degraded`:
    it answers, uncached (mlxc.store_guard). The reason names no path: the open body has it."""
    problem = state.service.store.degraded
    if problem is None or status != "healthy":
        return status, {}
    return "degraded", {"reason": problem.reason}


def _world() -> dict[str, Any]:
    """A sharded server's world (mlxc serve --distributed/--shards): ranks, hosts, backend."""
    from mlxc.distributed import serving

    return {"world": serving.ROLE.describe()} if serving.ROLE is not None else {}


@router.get("/health")
async def health(request: Request) -> Response:
    state = get_state(request)
    status, loaded, depth = _engine_status(state)
    if not key_given(request.headers, state.options.api_key):  # no paths, no figures
        status, reason = _degraded(state, status)
        body = {"status": status, **reason, "model_loaded": loaded, "version": __version__}
        return JSONResponse(body, status_code=503 if status == "error" else 200)
    stats, prefix = await _in_stats_thread(_both_stats, state)
    models = _models(state)
    status, reason = _degraded(state, status)  # after the figures: reading them may find it
    cache: dict[str, Any] = {"error": "the response store cannot be read"}
    if (problem := state.service.store.degraded) is not None:
        cache = {"error": problem.detail,
                 "retry_in_seconds": round(problem.retry_in(time.monotonic()), 1)}
    if stats is not None:
        cache = {
            "hits": stats["hits"],
            "misses": stats["misses"],
            "total_requests": stats["total_requests"],
            "hit_rate": f"{stats['hit_rate']:.1%}",
            "cached_items": stats["cached_items"],
            "size_bytes": stats["size_bytes"],
            "size_limit_bytes": stats["size_limit"],
            "eviction_policy": stats["eviction_policy"],
            "backend": stats["backend"],
        }
    served = state.metrics.snapshot()
    body = {
        "status": status,
        **reason,
        "model": state.model_id,
        "model_loaded": loaded,
        "cache": cache,
        "prefix_cache": prefix,
        "queue_depth": depth,
        "batch": _batch_figures(state),
        "models": models,  # every model served, loaded or not; the first is the default
        **_world(),
        "requests_in_flight": served.pop("in_flight"),
        "tokens_per_second": served.pop("tokens_per_second"),
        "server": served,
        "uptime_seconds": round(time.time() - state.started, 1),
        "version": __version__,
    }
    return JSONResponse(body, status_code=503 if status == "error" else 200)


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    state = get_state(request)
    _status, loaded, depth = _engine_status(state)
    batch = _batch_figures(state)
    gauges: dict[str, tuple[str, float]] = {
        "mlxc_model_loaded": ("1 once the model is loaded.", float(loaded)),
        "mlxc_queue_depth": ("Generations running or waiting for the engine.", depth),
        "mlxc_running_sequences": ("Sequences prefilling or decoding.", batch["running"]),
        "mlxc_waiting_requests": ("Requests waiting for a place in the batch.",
                                  batch["waiting"]),
        "mlxc_engine_tokens_per_second": ("Tokens/s of all sequences, last 10 s.",
                                          batch["tokens_per_second"]),
    }
    if spec := batch.get("speculation"):  # speculative decoding (engine/decode/speculate.py)
        gauges["mlxc_speculative_drafted_tokens"] = ("Draft tokens verified.", spec["drafted"])
        gauges["mlxc_speculative_accepted_tokens"] = ("Draft tokens accepted.",
                                                      spec["accepted"])
        gauges["mlxc_speculative_acceptance_rate"] = ("Accepted / drafted.",
                                                      spec["acceptance_rate"])
        for source, counts in spec.get("sources", {}).items():  # ngram, prediction, draft
            for what in ("drafted", "accepted"):
                gauges[f"mlxc_speculative_{source}_{what}_tokens"] = (
                    f"Draft tokens {what} ({source}).", counts[what])
    if batch.get("kv_memory_limit_bytes"):  # memory-aware admission (engine/batch/admission.py)
        gauges["mlxc_kv_memory_limit_bytes"] = ("KV cache memory admission allows.",
                                                batch["kv_memory_limit_bytes"])
        gauges["mlxc_kv_memory_reserved_bytes"] = ("KV cache memory reserved by admitted "
                                                   "sequences.", batch["kv_memory_reserved_bytes"])
    if (stats := await _in_stats_thread(_store_stats, state)) is not None:
        gauges["mlxc_cache_items"] = ("Answers in the response cache.", stats["cached_items"])
        gauges["mlxc_cache_bytes"] = ("Size of the response cache.", stats["size_bytes"])
        gauges["mlxc_cache_store_hits"] = ("Hits counted by the store (all processes).",
                                           stats["hits"])
        gauges["mlxc_cache_store_misses"] = ("Misses counted by the store (all processes).",
                                             stats["misses"])
    return PlainTextResponse(
        state.metrics.render(gauges, batch["batch_sizes"], _per_model(state)),
        media_type="text/plain; version=0.0.4; charset=utf-8",
    )


def _per_model(state: ServerState) -> dict[str, tuple[str, str, dict[str, float]]]:
    """Families labelled by model: name -> (kind, help, {model: value})."""
    rows = state.pool.figures()

    def by_model(read) -> dict[str, float]:
        return {row["name"]: read(row) for row in rows}

    def batch(key: str):
        return lambda row: (row["batch"] or {}).get(key, 0)

    return {
        "mlxc_model_up": ("gauge", "1 while the model is loaded (0: not yet, or unloaded).",
                          by_model(lambda row: int(row["state"] == "loaded"))),
        "mlxc_model_queue_depth": ("gauge", "Generations running or waiting, per model.",
                                   by_model(lambda row: row["queue_depth"])),
        "mlxc_model_running_sequences": ("gauge", "Sequences prefilling or decoding.",
                                         by_model(batch("running"))),
        "mlxc_model_tokens_per_second": ("gauge", "Tokens/s of the model's sequences, last "
                                         "10 s.", by_model(batch("tokens_per_second"))),
        "mlxc_model_weights_bytes": ("gauge", "The model's weights in memory, once loaded.",
                                     by_model(lambda row: row["weights_bytes"] or 0)),
        "mlxc_model_requests_total": ("counter", "Requests routed to the model.",
                                      by_model(lambda row: row["requests"])),
        "mlxc_model_loads_total": ("counter", "Times the model was loaded.",
                                   by_model(lambda row: row["loads"])),
        "mlxc_model_unloads_total": ("counter", "Times it was unloaded to make room.",
                                     by_model(lambda row: row["unloads"])),
    }

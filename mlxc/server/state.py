"""What every route shares: the models (a pool of services), the server's options and its
metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from mlxc.request import GenerationRequest
from mlxc.server.conversations import Conversations
from mlxc.server.errors import ApiError, as_api_error
from mlxc.server.metrics import Metrics
from mlxc.server.model_pool import ModelPool, ServedModel
from mlxc.service import Service


@dataclass(frozen=True)
class ServerOptions:
    api_key: str | None = None
    temperature: float = 0.0  # for requests that leave it out, as mlx_lm.server does
    keepalive: float = 10.0  # seconds of silence before a stream sends `: keep-alive`
    max_body_bytes: int = 4 << 20
    # More model names to answer to, globs allowed: clients such as Claude Code send their own.
    aliases: tuple[str, ...] = ()
    log: Callable[[str], None] | None = None
    miss_excerpts: bool = True  # text around a prefix divergence in /v1/cache/misses


@dataclass
class ServerState:
    service: Service  # the default model's (the first -m)
    options: ServerOptions
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)
    pool: ModelPool | None = None  # None: this one service, under its name and the aliases

    def __post_init__(self) -> None:
        if self.pool is None:
            self.pool = ModelPool.of(self.service, self.options.aliases)

    @cached_property
    def conversations(self) -> Conversations:
        """Stored Responses (previous_response_id), next to the response cache."""
        return Conversations(self.service.settings.cache_dir / "conversations")

    @cached_property
    def hit_threads(self) -> ThreadPoolExecutor:
        """Where cache hits are looked up. Two threads, not the 40 of the shared pool: under
        many clients those convoyed on the store's lock and the GIL, and the event loop
        waited behind them (benchmarks/server_load.py)."""
        return ThreadPoolExecutor(2, thread_name_prefix="mlxc-hits")

    @cached_property
    def stats_thread(self) -> ThreadPoolExecutor:
        """Where /health and /metrics read the store's figures: its own thread, so that they
        never wait behind requests that hold the shared pool (a model loading, a full queue)."""
        return ThreadPoolExecutor(1, thread_name_prefix="mlxc-stats")

    @cached_property
    def misses(self) -> Any:
        """The last generations' prefix reports (server/misses.py)."""
        from mlxc.server.misses import Misses  # it imports this module

        return Misses(self.options.miss_excerpts)

    @property
    def model_id(self) -> str:
        """The default model's name in /v1/models (server/model_names.py)."""
        return self.pool.default.name

    def route(self, name: str | None) -> tuple[str, ServedModel]:
        """(the name to echo back, the model that answers); an unknown name is a 404."""
        if not name or name == "default":
            return self.model_id, self.pool.default
        model = self.pool.find(name)
        if model is None:
            served = ", ".join(repr(m.name) for m in self.pool.models)
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server runs {served} "
                "(see /v1/models, or start it with --alias)",
                param="model",
                code="model_not_found",
            )
        return name, model

    def check_model(self, name: str | None) -> str:
        """The model name to echo back; an unknown name is a 404."""
        return self.route(name)[0]

    def generation_request(self, **fields: Any) -> GenerationRequest:
        """The canonical request: omitted fields take the defaults `mlxc ask` uses (so the
        two share cache keys), an omitted temperature the server's."""
        given = {k: v for k, v in fields.items() if v is not None}
        given.setdefault("temperature", self.options.temperature)
        try:
            return GenerationRequest(**given)
        except ValidationError as exc:
            raise as_api_error(exc) from None


def get_state(request: Request) -> ServerState:
    return request.app.state.mlxc

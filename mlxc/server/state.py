"""What every route shares: the service, the server's options and its metrics."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request

from mlxc.request import GenerationRequest
from mlxc.server.conversations import Conversations
from mlxc.server.errors import ApiError, as_api_error
from mlxc.server.metrics import Metrics
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
    service: Service
    options: ServerOptions
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)

    @cached_property
    def conversations(self) -> Conversations:
        """Stored Responses (previous_response_id), next to the response cache."""
        return Conversations(self.service.settings.cache_dir / "conversations")

    @cached_property
    def misses(self) -> Any:
        """The last generations' prefix reports (server/misses.py)."""
        from mlxc.server.misses import Misses  # it imports this module

        return Misses(self.options.miss_excerpts)

    @property
    def model_id(self) -> str:
        """The name /v1/models lists: the user's name for hub and default models, the
        folder or file name (not a whole path) for local ones."""
        ref = self.service.ref
        return ref.name if ref.source in ("default", "hub") else Path(ref.name).name

    def model_names(self) -> list[str]:
        ref = self.service.ref
        names = [self.model_id, *self.options.aliases, ref.name, ref.folder.name]
        if ref.source == "gguf":
            names.append(Path(ref.name).stem)
        return list(dict.fromkeys(names))

    def check_model(self, name: str | None) -> str:
        """The model name to echo back; an unknown name is a 404 (this server runs one)."""
        if not name or name == "default":
            return self.model_id
        wanted = name.lower()
        known = wanted in {n.lower() for n in self.model_names()}
        if not known and not any(fnmatchcase(wanted, a.lower()) for a in self.options.aliases):
            raise ApiError(
                404,
                f"model {name!r} is not served here; this server runs {self.model_id!r} "
                "(see /v1/models, or start it with --alias)",
                param="model",
                code="model_not_found",
            )
        return name

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

"""GET /v1/models and /v1/models/{id}, in Anthropic's shape when the request is Anthropic's
(its `anthropic-version` header or `x-api-key`), else in OpenAI's."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxc.server.errors import is_anthropic
from mlxc.server.model_pool import ServedModel
from mlxc.server.pipeline import State, authorized
from mlxc.server.state import ServerState

router = APIRouter(dependencies=[Depends(authorized)])


def _listed(state: ServerState) -> list[tuple[str, ServedModel]]:
    """Every model served, loaded or not, then the aliases that are not globs."""
    return [(name, state.pool.models[i]) for name, i in state.pool.names.listed()]


def _openai(state: ServerState, name: str, model: ServedModel) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(state.started), "owned_by": "mlxc"}


def _anthropic(state: ServerState, name: str, model: ServedModel) -> dict[str, Any]:
    engine = model.service._engine  # noqa: SLF001 - a look, never a start
    context = getattr(engine, "context_length", 0) or None
    created = datetime.fromtimestamp(state.started, timezone.utc)
    return {"type": "model", "id": name, "display_name": name,
            "created_at": created.isoformat().replace("+00:00", "Z"), "lifecycle": "active",
            "max_input_tokens": context, "max_tokens": context}


@router.get("/v1/models")
async def list_models(request: Request, state: State) -> Response:
    rows = _listed(state)
    if is_anthropic(request):
        return JSONResponse({"data": [_anthropic(state, *row) for row in rows],
                             "has_more": False, "first_id": rows[0][0], "last_id": rows[-1][0]})
    return JSONResponse({"object": "list", "data": [_openai(state, *row) for row in rows]})


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request, state: State) -> Response:
    name, model = state.route(name)
    shape = _anthropic if is_anthropic(request) else _openai
    return JSONResponse(shape(state, name, model))

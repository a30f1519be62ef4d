"""GET /v1/models and /v1/models/{id}, in Anthropic's shape when the request is Anthropic's
(its `anthropic-version` header or `x-api-key`), else in OpenAI's."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Depends
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mlxc.server.errors import is_anthropic
from mlxc.server.pipeline import State, authorized
from mlxc.server.state import ServerState

router = APIRouter(dependencies=[Depends(authorized)])


def _listed(state: ServerState) -> list[str]:
    return [state.model_id, *(a for a in state.options.aliases if not set(a) & set("*?["))]


def _openai(state: ServerState, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(state.started), "owned_by": "mlxc"}


def _anthropic(state: ServerState, name: str) -> dict[str, Any]:
    engine = state.service._engine if state.service.engine_started else None
    context = getattr(engine, "context_length", 0) or None
    created = datetime.fromtimestamp(state.started, timezone.utc)
    return {"type": "model", "id": name, "display_name": name,
            "created_at": created.isoformat().replace("+00:00", "Z"), "lifecycle": "active",
            "max_input_tokens": context, "max_tokens": context}


@router.get("/v1/models")
async def list_models(request: Request, state: State) -> Response:
    names = _listed(state)
    if is_anthropic(request):
        return JSONResponse({"data": [_anthropic(state, n) for n in names], "has_more": False,
                             "first_id": names[0], "last_id": names[-1]})
    return JSONResponse({"object": "list", "data": [_openai(state, n) for n in names]})


@router.get("/v1/models/{name:path}")
async def get_model(name: str, request: Request, state: State) -> Response:
    name = state.check_model(name)
    shape = _anthropic if is_anthropic(request) else _openai
    return JSONResponse(shape(state, name))

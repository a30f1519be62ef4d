"""API errors, each rendered in the JSON shape of the endpoint family that raised it, and the
guarded reading of a request: API key, body size, JSON, pydantic model.

OpenAI: `{"error": {"message", "type", "param", "code"}}`.
Anthropic: `{"type": "error", "error": {"type", "message"}}`.
"""

from __future__ import annotations

import hmac
import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from mlxc.config import ConfigError
from mlxc.errors import EngineBusy, ModelError, NotEnoughMemory, PromptTooLong, describe
from mlxc.server.depth import MAX_DEPTH, json_depth
from mlxc.store import StoreError

Body = TypeVar("Body", bound=BaseModel)
# \ud800-\udfff as JSON escapes them: only a body that has one is searched for a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF]")

_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
}


class ApiError(Exception):
    """An HTTP error with a message for the client; never carries a traceback."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers  # e.g. Retry-After on a 503


def is_anthropic(request: Request) -> bool:
    """Anthropic's dialect: its routes, or (on shared routes such as /v1/models) its headers.
    A route's own dialect, set by its router's dependency, comes first."""
    dialect = getattr(request.state, "dialect", None)
    if dialect is not None:
        return dialect == "anthropic"
    if request.url.path.startswith("/v1/messages"):
        return True
    return "anthropic-version" in request.headers or "x-api-key" in request.headers


def error_body(error: ApiError, anthropic: bool) -> dict[str, Any]:
    if anthropic:
        default = "invalid_request_error" if error.status < 500 else "api_error"
        kind = _ANTHROPIC_TYPES.get(error.status, default)
        return {"type": "error", "error": {"type": kind, "message": error.message}}
    kind = "server_error" if error.status >= 500 else "invalid_request_error"
    if error.status == 401:
        kind = "authentication_error"
    return {
        "error": {"message": error.message, "type": kind, "param": error.param, "code": error.code}
    }


def error_response(error: ApiError, request: Request) -> JSONResponse:
    return JSONResponse(
        error_body(error, is_anthropic(request)), status_code=error.status, headers=error.headers
    )


def as_api_error(exc: BaseException) -> ApiError:
    """Map what the service and engine raise to a client-facing error."""
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, ValidationError):
        errors = exc.errors()
        param = ".".join(str(p) for p in errors[0]["loc"]) if errors else None
        return ApiError(400, describe(exc), param=param or None, code="invalid_value")
    if isinstance(exc, EngineBusy):  # a full queue: clients' retry logic reads Retry-After
        return ApiError(
            503, str(exc), code="overloaded", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, NotEnoughMemory):  # never fits, even alone: retrying cannot help
        return ApiError(400, str(exc), param="max_tokens", code="kv_memory_exceeded")
    if isinstance(exc, PromptTooLong):
        return ApiError(400, str(exc), param="messages", code="context_length_exceeded")
    if isinstance(exc, (ModelError, StoreError)):
        return ApiError(503, str(exc), code="unavailable")
    if isinstance(exc, (ConfigError, ValueError)) or type(exc).__module__.startswith("jinja2"):
        # the chat template rejects some message sequences (roles out of order, ...)
        return ApiError(400, str(exc), code="invalid_value")
    return ApiError(500, f"internal error ({type(exc).__name__}); the server keeps running")


def check_api_key(request: Request, api_key: str | None) -> None:
    """Bearer token (OpenAI clients) or x-api-key (Anthropic clients), compared in constant
    time. Either header is accepted on every route: proxies mix them."""
    if not api_key:
        return
    given = request.headers.get("x-api-key", "")
    auth = request.headers.get("authorization", "")
    if auth[:7].lower() == "bearer ":
        given = given or auth[7:].strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise ApiError(401, "invalid or missing API key", code="invalid_api_key")


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, refusing more than `limit` bytes even without a Content-Length."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is larger than {limit} bytes", code="too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, f"request body is larger than {limit} bytes", code="too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def parse_body(request: Request, model: type[Body], limit: int) -> Body:
    """Body -> JSON object -> pydantic model; any problem is a 400 naming the field."""
    raw = await read_body(request, limit)
    if (depth := json_depth(raw)) > MAX_DEPTH:
        raise ApiError(400, f"the body nests {depth} levels deep; at most {MAX_DEPTH} are "
                       "accepted", code="invalid_json")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ApiError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw) and (where := lone_surrogate(data)) is not None:
        # Valid JSON, but not text: it cannot be encoded, hashed into a key or tokenized.
        raise ApiError(400, f"{where or 'the body'} holds a lone UTF-16 surrogate: not valid "
                       "Unicode (send characters past U+FFFF as UTF-8 or as a surrogate pair)",
                       param=where or None, code="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise as_api_error(exc) from None


def lone_surrogate(data: Any, path: str = "") -> str | None:
    """Where parsed JSON holds a string (value or key) with a lone UTF-16 surrogate, as a
    dotted path ('messages.0.content'; '' for the top); None if nowhere."""
    if isinstance(data, str):
        try:
            data.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(data, dict):
        items = data.items()
    elif isinstance(data, list):
        items = enumerate(data)
    else:
        return None
    for name, value in items:
        # the path goes into the error body: a key's own surrogate is written as an escape
        shown = str(name).encode("utf-8", "backslashreplace").decode()
        here = f"{path}.{shown}" if path else shown
        if isinstance(name, str) and lone_surrogate(name) is not None:
            return here
        if (where := lone_surrogate(value, here)) is not None:
            return where
    return None

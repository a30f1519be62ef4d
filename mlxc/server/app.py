"""The FastAPI app: routes, the request log and cache header, and errors in each API's shape.

    app = create_app(Service(settings), ServerOptions(api_key="..."))

Handlers stay thin over mlxc.service; nothing here waits on MLX (the engine has its own
thread) or on disk in the event loop (store calls run in the thread pool).
"""

from __future__ import annotations

import time

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxc import __version__
from mlxc.server import anthropic, health, models, openai
from mlxc.server.errors import ApiError, as_api_error, error_response
from mlxc.server.flow import ClientGone
from mlxc.server.state import ServerOptions, ServerState
from mlxc.service import Service


class RequestLog:
    """Pure ASGI (so streams pass through untouched): adds `X-Mlxc-Cache` to every response,
    counts the request in the metrics and logs one line when its last byte is sent."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        info = scope.setdefault("state", {})  # the dict behind request.state
        started = time.perf_counter()
        status = 0

        async def send_with_header(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = MutableHeaders(scope=message)
                if "x-mlxc-cache" not in headers:
                    headers["X-Mlxc-Cache"] = info.get("cache", "bypass")
            await send(message)

        self.state.metrics.request_started()
        try:
            await self.app(scope, receive, send_with_header)
        finally:
            seconds = time.perf_counter() - started
            cache = info.get("cache", "-")
            path = scope.get("path", "")
            self.state.metrics.on_request(path, status or 499, cache, seconds)
            if self.state.options.log is not None:
                tokens = info.get("tokens")
                self.state.options.log(
                    f"{scope.get('method', '')} {path} {status or 'gone'} {cache}"
                    + (f" {tokens} tok" if tokens is not None else "")
                    + f" {seconds * 1000:.0f} ms"
                )


def create_app(service: Service, options: ServerOptions | None = None) -> FastAPI:
    state = ServerState(service, options or ServerOptions())
    # Bodies are parsed by hand (mlxc.server.errors.parse_body) so that each API gets its
    # own error shape; FastAPI's generated docs would not describe them, so they are off.
    app = FastAPI(
        title="mlxc", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.mlxc = state
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(models.router)
    app.include_router(health.router)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return error_response(exc, request)

    @app.exception_handler(ClientGone)
    async def _client_gone(_request: Request, _exc: ClientGone) -> Response:
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        return error_response(ApiError(exc.status_code, str(exc.detail)), request)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return error_response(as_api_error(exc), request)

    app.add_middleware(RequestLog, state=state)
    return app

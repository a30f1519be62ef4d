"""The FastAPI app: routes, the request log and cache header, and errors in each API's shape.

    app = create_app(Service(settings), ServerOptions(api_key="..."))

Handlers stay thin over mlxc.service; nothing here waits on MLX (the engine has its own
thread) or on disk in the event loop (store calls run in the thread pool).
"""

from __future__ import annotations

import asyncio
import logging
import time
from http import HTTPStatus

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mlxc import __version__
from mlxc.server import anthropic, dashboard, health, misses, models, openai, responses
from mlxc.server.errors import ApiError, as_api_error, error_response
from mlxc.server.fastpath import HitFastPath
from mlxc.server.flow import ClientGone
from mlxc.server.guard import ClientTooSlow, Guard, GuardOptions
from mlxc.server.model_pool import ModelPool
from mlxc.server.state import ServerOptions, ServerState
from mlxc.service import Service

log = logging.getLogger("mlxc.server")


class RequestLog:
    """Pure ASGI (so streams pass through untouched): adds `X-Mlxc-Cache` to every response,
    counts the request in the metrics and logs one line when its last byte is sent. An
    unexpected exception is answered here in the API's shape (Starlette's outermost handler
    would answer after this line was logged as 'gone'), and every 5xx line says why."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.told: set[type] = set()

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
        path = scope.get("path", "")
        try:
            await self.app(scope, receive, send_with_header)
        except ClientTooSlow:
            info["error"] = "the client stopped reading; closed"
        except asyncio.CancelledError:  # the end of `--shutdown-timeout`: said, then passed on
            info["error"] = "cancelled: the server is stopping"
            raise
        except Exception as exc:  # what no handler answered: a bug, said once with its cause
            error = as_api_error(exc)
            info["error"] = f"{type(exc).__name__}: {exc}"
            if type(exc) not in self.told:  # the traceback once per kind: no flood
                self.told.add(type(exc))
                log.error("%s %s failed", scope.get("method", ""), path, exc_info=exc)
            if not status:
                await error_response(error, Request(scope))(scope, receive, send_with_header)
        finally:
            seconds = time.perf_counter() - started
            cache = info.get("cache", "-")
            self.state.metrics.on_request(path, status or 499, cache, seconds)
            say = self.state.options.log
            if say is not None:
                tokens = info.get("tokens")
                why = f" ({info['error']})" if info.get("error") else ""
                say(
                    f"{scope.get('method', '')} {path} {status or 'gone'} {cache}"
                    + (f" {tokens} tok" if tokens is not None else "")
                    + f" {seconds * 1000:.0f} ms{why}"
                )


def create_app(
    service: Service | ModelPool, options: ServerOptions | None = None,
    guard: GuardOptions | None = None,
) -> FastAPI:
    """The app on one model's service, or on several (a ModelPool, routed by `model`);
    `guard` says which hosts and origins may call it (loopback only by default)."""
    pool = service if isinstance(service, ModelPool) else None
    state = ServerState(pool.default.service if pool else service, options or ServerOptions(),
                        pool=pool)
    guard = guard or GuardOptions(api_key=state.options.api_key)
    # Bodies are parsed by hand (mlxc.server.errors.parse_body) so that each API gets its
    # own error shape; FastAPI's generated docs would not describe them, so they are off.
    app = FastAPI(
        title="mlxc", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.mlxc = state
    app.include_router(openai.router)
    app.include_router(anthropic.router)
    app.include_router(models.router)
    app.include_router(responses.router)
    app.include_router(health.router)
    app.include_router(misses.router)
    app.include_router(dashboard.router)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        if exc.status >= 500:
            request.state.error = exc.message  # for the request's log line
        return error_response(exc, request)

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)  # it hung up before its whole body was sent
    async def _client_gone(request: Request, exc: Exception) -> Response:
        if isinstance(exc, ClientDisconnect):  # the client's doing: a line, no traceback
            request.state.error = "the client disconnected before sending its whole body"
        return Response(status_code=499)  # nginx's "client closed request"; nobody reads it

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> Response:
        message, status = str(exc.detail), exc.status_code
        if status in (404, 405) and message == HTTPStatus(status).phrase:  # the router's own
            what = "URL" if status == 404 else "method for URL"
            message = f"Invalid {what} ({request.method} {request.url.path})"  # OpenAI's words
        error = ApiError(status, message, headers=exc.headers)  # 405 keeps its Allow
        return error_response(error, request)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def _root(request: Request) -> Response:  # what clients (Claude Code) probe
        if dashboard.wants_page(request):  # a browser: the dashboard (server/dashboard.py)
            return dashboard.page()
        return JSONResponse({"name": "mlxc", "version": __version__, "status": "ok"})

    # Innermost: repeated hits and /health skip routing and parsing (server/fastpath.py).
    app.add_middleware(HitFastPath, state=state)
    app.add_middleware(RequestLog, state=state)
    if guard.cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware, allow_origins=list(guard.cors), allow_methods=["*"],
            allow_headers=["*"], expose_headers=["X-Mlxc-Cache", "X-Mlxc-Prefix"], max_age=600,
        )
    app.add_middleware(Guard, options=guard, say=state.options.log or log.warning)
    return app

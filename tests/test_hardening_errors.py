"""A bug that no handler answers: the client gets a 500 in the route's own shape, the log
says which exception (once with its traceback), and the metrics count a 500, not a 499.
In process (a route that raises is planted on the real app), through real HTTP semantics
via httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import logging

import httpx
import pytest

from mlxc.config import Settings
from mlxc.server.app import create_app
from mlxc.server.state import ServerOptions
from mlxc.service import Service


def test_an_unexpected_error_is_a_logged_500_not_a_gone_499(tmp_path, tiny_model, caplog):
    lines: list[str] = []
    service = Service(Settings(model=str(tiny_model), cache_dir=tmp_path / "cache",
                               models_dir=tmp_path / "models"))
    app = create_app(service, ServerOptions(log=lines.append))

    async def boom() -> None:
        raise RuntimeError("planted bug")

    app.add_api_route("/v1/boom", boom, methods=["GET"])
    app.add_api_route("/v1/messages/boom", boom, methods=["GET"])

    async def run() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1") as c:
            return [await c.get("/v1/boom"), await c.get("/v1/boom"),
                    await c.get("/v1/messages/boom"), await c.get("/metrics")]

    try:
        with caplog.at_level(logging.ERROR, logger="mlxc.server"):
            first, second, anthropic, metrics = asyncio.run(run())
    finally:
        service.close()
    assert first.status_code == second.status_code == 500
    assert first.json()["error"]["type"] == "server_error"
    assert anthropic.json() == {"type": "error", "error": {
        "type": "api_error", "message": anthropic.json()["error"]["message"]}}
    assert [line for line in lines if " 500 " in line and "RuntimeError: planted bug" in line]
    assert not [line for line in lines if "gone" in line]
    assert 'status="500"' in metrics.text and 'status="499"' not in metrics.text
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1  # once per kind of exception: a loop of them cannot flood


def test_a_client_that_stops_reading_is_let_go(tmp_path, tiny_model):
    """A reply the client never reads: once the socket's buffers are full, uvicorn's send
    waits for the client forever (here: a send that never returns after the head). The
    guard gives up after --request-timeout, and the request ends as 'stopped reading'."""
    from starlette.responses import StreamingResponse

    from mlxc.server.guard import GuardOptions

    lines: list[str] = []
    service = Service(Settings(model=str(tiny_model), cache_dir=tmp_path / "cache",
                               models_dir=tmp_path / "models"))
    app = create_app(service, ServerOptions(log=lines.append), GuardOptions(body_timeout=0.5))

    async def endless():
        while True:
            yield b"data: more\n\n"
            await asyncio.sleep(0)

    app.add_api_route("/v1/endless", lambda: StreamingResponse(endless()), methods=["GET"])

    async def run() -> float:
        sent: list[dict] = []

        async def receive() -> dict:
            await asyncio.sleep(3600)  # the client neither sends nor hangs up
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            sent.append(message)
            if message["type"] == "http.response.body":
                await asyncio.sleep(3600)  # the socket is full: the client reads nothing

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
                 "method": "GET", "path": "/v1/endless", "raw_path": b"/v1/endless",
                 "query_string": b"", "headers": [(b"host", b"127.0.0.1")],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 8081), "scheme": "http"}
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(app(scope, receive, send), 10)
        assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
        return asyncio.get_running_loop().time() - started

    try:
        seconds = asyncio.run(run())
    finally:
        service.close()
    assert seconds < 5
    assert [line for line in lines if "GET /v1/endless 200" in line
            and "the client stopped reading" in line]


def test_one_timer_times_out_late_waits_and_leaves_other_cancellations_alone():
    """The guard's deadlines (one timer for all waits): a wait past its deadline raises
    TimeoutError and leaves its task usable; a cancellation from elsewhere (shutdown) is
    passed on as it came; a wait that finishes in time returns its value."""
    from mlxc.server.guard import Deadlines

    async def run() -> None:
        deadlines = Deadlines(period=0.02)
        loop = asyncio.get_running_loop()
        assert await deadlines.within(asyncio.sleep(0.01, "on time"), loop.time() + 5) == \
            "on time"
        with pytest.raises(asyncio.TimeoutError):
            await deadlines.within(asyncio.sleep(3600), loop.time() + 0.05)
        await asyncio.sleep(0)  # not cancelled any more: the task goes on
        assert asyncio.current_task().cancelling() == 0

        async def waits() -> None:
            await deadlines.within(asyncio.sleep(3600), loop.time() + 3600)

        other = asyncio.ensure_future(waits())
        await asyncio.sleep(0.05)
        other.cancel()
        with pytest.raises(asyncio.CancelledError):
            await other
        assert not deadlines.waiting

    asyncio.run(run())

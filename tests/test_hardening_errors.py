"""A bug that no handler answers: the client gets a 500 in the route's own shape, the log
says which exception (once with its traceback), and the metrics count a 500, not a 499.
In process (a route that raises is planted on the real app), through real HTTP semantics
via httpx's ASGI transport."""

from __future__ import annotations

import asyncio
import logging

import httpx

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

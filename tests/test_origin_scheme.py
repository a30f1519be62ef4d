"""The Origin check compares whole origins: this server itself is `http://` and its Host, so a
page served by `https://` or `ws://` on the same host and port is another origin, refused with
the same 403 as any foreign page. The guard alone, in process: no model, no server."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from mlxc.server.guard import Guard, GuardOptions

HOST = "localhost:8081"
CORS = "http://localhost:3000"
PATHS = ("/v1/chat/completions", "/v1/messages")  # OpenAI's error shape, Anthropic's


@pytest.fixture(scope="module")
def client() -> TestClient:
    async def ok(request):
        return JSONResponse({"ok": True})

    app = Starlette(routes=[Route(p, ok, methods=["POST"]) for p in PATHS])
    guarded = Guard(app, GuardOptions(cors=(CORS,)), say=lambda _line: None)
    return TestClient(guarded, base_url=f"http://{HOST}")


def post(client: TestClient, path: str, origin: str):
    return client.post(path, json={}, headers={"Origin": origin})


@pytest.mark.parametrize("path", PATHS)
def test_own_host_and_port_under_another_scheme_is_refused_like_a_foreign_page(client, path):
    foreign = post(client, path, "https://evil.example")
    assert foreign.status_code == 403
    shape = foreign.json()
    for origin in (f"https://{HOST}", f"ws://{HOST}", f"wss://{HOST}", f"ftp://{HOST}",
                   f"HTTPS://{HOST.upper()}", "https://localhost:3000", "ws://localhost:3000"):
        r = post(client, path, origin)
        assert r.status_code == 403, origin
        body = r.json()
        assert body.keys() == shape.keys() and body["error"].keys() == shape["error"].keys()
        assert body["error"]["type"] == shape["error"]["type"]
        if path == PATHS[0]:
            assert body["error"]["code"] == "origin_not_allowed"
        assert repr(origin) in body["error"]["message"]


@pytest.mark.parametrize("path", PATHS)
def test_the_servers_own_http_origin_and_cors_origins_pass(client, path):
    for origin in (f"http://{HOST}", f"HTTP://{HOST.upper()}", f"http://{HOST}/", CORS):
        assert post(client, path, origin).status_code == 200, origin
    assert client.post(path, json={}).status_code == 200  # no Origin: not a browser page

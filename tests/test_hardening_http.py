"""What a hostile web page or a slow client can do to `mlxc serve`: foreign Host and Origin,
bodies that are not JSON, half-sent heads and bodies, more connections than the cap.
A real server on the tiny model, with short limits so that each test is bounded."""

# ruff: noqa: F811  (fixtures imported from test_server_api are redefined as arguments)

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest
from live_server import mlxc_server
from test_server_api import KEY, server  # noqa: F401

TIMEOUT = 1.5  # --request-timeout of the guarded server
CAP = 24  # --max-connections
ORIGIN = "http://localhost:3000"
CHAT = {"model": "tiny-llama", "max_tokens": 2,
        "messages": [{"role": "user", "content": "Hello there"}]}


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, tiny_model):
    """(url, pid, log path): a keyless server with short limits and one CORS origin."""
    with mlxc_server(tmp_path_factory.mktemp("guarded"), tiny_model, "--cors", ORIGIN,
                     "--request-timeout", str(TIMEOUT), "--max-connections", str(CAP),
                     "--allowed-hosts", "mlxc.lan") as running:
        yield running


def post(url: str, body: bytes, headers: dict, path="/v1/chat/completions") -> httpx.Response:
    return httpx.post(f"{url}{path}", content=body, headers=headers, timeout=60)


JSON = {"Content-Type": "application/json"}
GOOD = httpx.Request("POST", "http://x", json=CHAT).content


def test_foreign_host_is_refused_and_own_names_are_served(guarded):
    url, _, _ = guarded
    port = url.rsplit(":", 1)[1]
    for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.nip.io", "mlxc.lan.evil"):
        r = post(url, GOOD, {**JSON, "Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", host
    r = post(url, GOOD, {**JSON, "Host": "evil.example"}, path="/v1/messages")
    assert r.status_code == 403 and r.json()["type"] == "error"  # Anthropic's shape
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "LOCALHOST", "mlxc.lan",
                 f"[::1]:{port}", "app.localhost", "192.168.1.5:8081"):
        assert post(url, GOOD, {**JSON, "Host": host}).status_code == 200, host


def test_cross_site_pages_are_refused_and_cors_origin_is_served(guarded):
    url, _, _ = guarded
    for origin in ("https://evil.example", "null", "http://localhost:3001"):
        r = post(url, GOOD, {**JSON, "Origin": origin})
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    ok = post(url, GOOD, {**JSON, "Origin": ORIGIN})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == ORIGIN
    preflight = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,authorization"})
    assert preflight.status_code == 200
    assert preflight.headers["access-control-allow-origin"] == ORIGIN
    bad = httpx.options(f"{url}/v1/chat/completions", headers={
        "Origin": "https://evil.example", "Access-Control-Request-Method": "POST"})
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers


def test_bodies_that_are_not_json_get_415(guarded):
    url, _, _ = guarded
    # what a cross-site <form enctype="text/plain"> or a no-cors fetch can send
    for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                 None):
        headers = {"Content-Type": kind} if kind else {}
        r = post(url, GOOD, headers)
        assert r.status_code == 415 and r.json()["error"]["code"] == "unsupported_media_type"
    r = post(url, GOOD, {"Content-Type": "text/plain"}, path="/v1/messages")
    assert r.status_code == 415 and r.json()["error"]["type"] == "invalid_request_error"
    ok = post(url, GOOD, {"Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200


def _half_open(url: str, head: bytes) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(head)
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> bytes:
    """What the server sent before closing; fails if it still holds the socket open."""
    sock.settimeout(seconds)
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except TimeoutError:
        pytest.fail(f"the server held a slow connection past {seconds} s: {data!r}")
    except ConnectionResetError:
        pass
    finally:
        sock.close()
    return data


def test_half_sent_head_and_body_are_closed_in_time(guarded):
    url, _, _ = guarded
    head = _half_open(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    silent = _half_open(url, b"")
    body = _half_open(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                      b"Content-Type: application/json\r\nContent-Length: 500\r\n\r\n{\"mod")
    started = time.monotonic()
    assert b"408" in _closed_within(head, TIMEOUT + 5)
    _closed_within(silent, TIMEOUT + 5)
    reply = _closed_within(body, TIMEOUT + 5)
    assert reply.startswith(b"HTTP/1.1 408") and b'"code":"timeout"' in reply
    assert time.monotonic() - started < TIMEOUT + 5


def test_a_trickling_client_is_closed(guarded):
    url, _, _ = guarded
    sock = _half_open(url, b"G")
    started = time.monotonic()
    try:
        for byte in b"ET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n":
            time.sleep(0.2)
            sock.send(bytes([byte]))
    except OSError:
        pass  # closed by the server: what should happen
    _closed_within(sock, TIMEOUT + 5)
    assert time.monotonic() - started < TIMEOUT + 6


def _open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc")
def test_a_slowloris_flood_neither_exhausts_fds_nor_stops_health(guarded):
    url, pid, log_path = guarded
    before = _open_fds(pid)
    flood = [_half_open(url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
             for _ in range(CAP * 3)]
    try:
        for _ in range(5):  # a real client still gets through, at once
            started = time.monotonic()
            assert httpx.get(f"{url}/health", timeout=5).status_code == 200
            assert time.monotonic() - started < 1.0
        assert _open_fds(pid) <= before + CAP + 2
    finally:
        for sock in flood:
            sock.close()
    lines = log_path.read_text().splitlines()
    assert sum("oldest idle connection" in line for line in lines) <= 2  # said, not flooded


def test_the_log_is_not_flooded_by_refusals(guarded):
    url, _, log_path = guarded
    with httpx.Client(timeout=10) as client:
        for i in range(150):
            client.post(f"{url}/v1/chat/completions", content=GOOD,
                        headers={**JSON, "Host": f"rebind-{i}.example"})
            client.post(f"{url}/v1/chat/completions", content=b"x",
                        headers={"Content-Type": "text/plain"})
    text = log_path.read_text()
    assert text.count("rebind-") <= 2 and text.count("refused bodies of type") <= 2


def test_metrics_need_the_key_and_health_says_little_without_it(server):
    assert httpx.get(f"{server}/metrics").status_code == 401
    auth = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{server}/metrics", headers=auth).status_code == 200
    bare = httpx.get(f"{server}/health").json()
    assert set(bare) == {"status", "model_loaded", "version"}
    full = httpx.get(f"{server}/health", headers=auth).json()
    assert "cache" in full and "prefix_cache" in full


def test_official_client_still_works_through_the_guard(guarded):
    url, _, _ = guarded
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    reply = client.chat.completions.create(**CHAT)
    assert reply.choices[0].finish_reason in ("stop", "length")


"""Miss explanations through a real `mlxc serve` and the real `openai` client (issue 27): the
X-Mlxc-Prefix header, GET /v1/cache/misses, its auth and excerpt switch, `mlxc cache misses`
and `mlxc cache stats --watch`, and `/` answering JSON to API clients, the page to browsers."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai
import pytest
from live_server import running_server

SYSTEM = "You are a helpful assistant. Answer briefly and cite the capital of France."
USER = "What is the capital of France? Answer briefly, please."
KEY = "sekret-27"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model):
    with running_server(tmp_path_factory.mktemp("misses"), tiny_model, "--api-key", KEY) as running:
        yield running


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def _ask(client, system: str, **extra):
    raw = client.chat.completions.with_raw_response.create(
        model="default", max_tokens=4, temperature=0,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": USER}],
        **extra)
    return raw.headers, raw.parse()


def _misses(url: str, key: str | None = KEY) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}/v1/cache/misses", headers=headers, timeout=10)


def test_a_changed_system_line_is_explained_in_header_list_and_log(server):
    client = _client(server.url)
    headers, first = _ask(client, SYSTEM)
    assert headers["x-mlxc-cache"] == "miss"
    assert headers["x-mlxc-prefix"].startswith(f"reused=0/{first.usage.prompt_tokens}; tier=none")
    time.sleep(0.5)  # the answer's state is stored as the engine lets go of it
    changed = SYSTEM.replace("helpful", "careful")
    headers, second = _ask(client, changed)
    value = headers["x-mlxc-prefix"]
    assert value.endswith("diverged=message 0 @ char 10"), value  # "You are a |helpful"
    reused = second.usage.prompt_tokens_details.cached_tokens
    assert value.startswith(f"reused={reused}/{second.usage.prompt_tokens}; ")
    row = _misses(server.url).json()["data"][-1]
    assert row["diverged"]["message"] == 0 and row["diverged"]["role"] == "system"
    assert row["diverged"]["char"] == 10
    assert row["diverged"]["excerpt"]["old"].startswith("helpful")
    assert row["diverged"]["excerpt"]["new"].startswith("careful")
    time.sleep(0.3)
    log = server.log.read_text()
    assert "prefix /v1/chat/completions reused=" in log and "message 0 @ char 10" in log
    assert "helpful assistant" not in log and "careful assistant" not in log  # no user text logged


def test_a_full_reuse_says_so_and_a_stored_answer_reused_everything(server):
    client = _client(server.url)
    _ask(client, SYSTEM + " Again.")
    time.sleep(0.5)
    # Past the response cache (no-cache), the same prompt is all in the prefix cache.
    headers, answer = _ask(client, SYSTEM + " Again.",
                           extra_headers={"Cache-Control": "no-cache"})
    n = answer.usage.prompt_tokens
    full = f"reused={n - 1}/{n}; tier=memory; diverged=none (full reuse)"
    assert headers["x-mlxc-prefix"] == full
    headers, answer = _ask(client, SYSTEM + " Again.")
    assert headers["x-mlxc-cache"] == "hit"
    assert headers["x-mlxc-prefix"] == f"reused={n}/{n}; tier=response; diverged=none"
    row = _misses(server.url).json()["data"][-1]
    assert row["full_reuse"] is True and row["diverged"] is None


def test_streams_carry_the_header_too(server):
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", timeout=60,
                      headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": "default", "max_tokens": 3, "stream": True,
                            "messages": [{"role": "user", "content": "Stream " + USER}]}) as r:
        assert r.status_code == 200
        assert r.headers["x-mlxc-prefix"].startswith("reused=")
        r.read()


def test_the_list_needs_the_key(server):
    assert _misses(server.url, key=None).status_code == 401
    assert _misses(server.url, key="wrong").status_code == 401


def test_cache_misses_cli_reads_the_server(server):
    run = subprocess.run(
        [sys.executable, "-m", "mlxc", "cache", "misses", "--url", server.url, "--json",
         "--last", "3"], capture_output=True, text=True, timeout=60,
        env={**server.env, "MLXC_API_KEY": KEY})
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert len(body["data"]) == 3 and body["excerpts"] is True
    table = subprocess.run(
        [sys.executable, "-m", "mlxc", "cache", "misses", "--url", server.url],
        capture_output=True, text=True, timeout=60, env={**server.env, "MLXC_API_KEY": KEY,
                                                          "COLUMNS": "200"})
    assert table.returncode == 0 and "message 0 @ char 10" in table.stdout, table.stdout


def test_stats_watch_reads_a_running_server(server):
    run = subprocess.run(
        [sys.executable, "-m", "mlxc", "cache", "stats", "--watch", "--url", server.url,
         "--watch-times", "2"], capture_output=True, text=True, timeout=60,
        env={**server.env, "MLXC_API_KEY": KEY, "COLUMNS": "120"})
    assert run.returncode == 0, run.stderr
    assert "prefix tokens reused" in run.stdout and "decode tokens/s" in run.stdout


def test_root_answers_json_to_api_clients_and_the_page_to_browsers(server):
    assert httpx.head(server.url + "/").status_code == 200
    probe = httpx.get(server.url + "/", headers={"Accept": "application/json"})
    assert probe.json()["name"] == "mlxc"
    assert httpx.get(server.url + "/").json()["status"] == "ok"  # Accept: */*
    page = httpx.get(server.url + "/", headers={"Accept": "text/html,*/*;q=0.8"})
    assert page.headers["content-type"].startswith("text/html") and "<svg" in page.text
    assert httpx.get(server.url + "/dashboard").text == page.text
    # The guard's rules hold for the page as for the API: a foreign Host is refused.
    assert httpx.get(server.url + "/dashboard", headers={"Host": "evil.example"}).status_code \
        in (400, 403, 421)


def test_excerpts_switched_off(tmp_path, tiny_model):
    with running_server(tmp_path, tiny_model, env={"MLXC_MISS_EXCERPTS": "0"}) as running:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="x", max_retries=0)
        _ask(client, SYSTEM)
        time.sleep(0.5)
        headers, _ = _ask(client, SYSTEM.replace("helpful", "careful"))
        assert headers["x-mlxc-prefix"].endswith("message 0 @ char 10")
        body = _misses(running.url, key=None).json()
        assert body["excerpts"] is False
        assert "excerpt" not in body["data"][-1]["diverged"]


def test_stats_watch_reads_the_local_folder(server):
    run = subprocess.run(
        [sys.executable, "-m", "mlxc", "cache", "stats", "--watch", "--watch-times", "1"],
        capture_output=True, text=True, timeout=60, env={**server.env, "COLUMNS": "120"})
    assert run.returncode == 0, run.stderr
    assert "response hits / misses" in run.stdout and "prefix disk" in run.stdout

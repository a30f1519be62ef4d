"""`mlxc serve -m A -m B`: two real models behind one server process, driven by the official
openai and anthropic clients. Model A is the tiny random llama, B a copy with its layer
weights scaled (tiny_model.rescaled_copy): other weights, so another fingerprint and other
answers. Checks that requests are routed by `model` (names, NAME=PATH, aliases and globs),
that answers never mix (response cache and prefix cache keyed by each model's fingerprint),
that switching between loaded models loads nothing, and that past --max-models the least
recently used model is unloaded and loaded again on its next request."""

from __future__ import annotations

import anthropic
import httpx
import openai
import pytest
from live_server import start_server, stop_server
from tiny_model import CORPUS, rescaled_copy

KEY = "models-key"
FOX = "The quick brown fox"
# ~150 tokens of the tiny model's tokenizer: a prefix worth reusing.
LONG = " ".join(CORPUS[:10])


@pytest.fixture(scope="module")
def second_model(tiny_model, tmp_path_factory):
    return rescaled_copy(tiny_model, tmp_path_factory.mktemp("second") / "tiny-scaled", 3.0)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model, second_model):
    running = start_server(
        tmp_path_factory.mktemp("two"), tiny_model, "--api-key", KEY, "--keepalive", "0.2",
        "-m", str(tiny_model), "-m", f"small={second_model}",
        "--alias", "claude-haiku*=small", "--alias", "claude-*", "--alias", "gpt-4o-mini",
    )
    yield running.url
    stop_server(running)


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ant(server):
    return anthropic.Anthropic(base_url=server, api_key=KEY, max_retries=0, timeout=120)


def _health(url: str) -> dict:
    return httpx.get(f"{url}/health", headers={"x-api-key": KEY}, timeout=10).json()


def _models(url: str) -> dict[str, dict]:
    return {row["name"]: row for row in _health(url)["models"]}


def _complete(oai, model: str, **kwargs) -> tuple[str, str]:
    raw = oai.completions.with_raw_response.create(model=model, prompt=FOX, max_tokens=8,
                                                   **kwargs)
    return raw.headers["x-mlxc-cache"], raw.parse().choices[0].text


def test_both_models_are_listed_and_only_the_default_is_loaded_at_start(server, oai, ant):
    assert _models(server)["small"]["state"] == "unloaded"  # first: nothing asked it yet
    ids = [m.id for m in oai.models.list().data]
    assert ids == ["tiny-llama", "small", "gpt-4o-mini"]
    assert [m.id for m in ant.models.list().data] == ids  # Anthropic's shape, same models
    assert oai.models.retrieve("claude-haiku-4-5").id == "claude-haiku-4-5"
    health = _health(server)
    assert health["model"] == "tiny-llama" and health["model_loaded"] is True
    assert [row["default"] for row in health["models"]] == [True, False]


def test_one_prompt_two_models_two_answers_and_the_cache_never_mixes_them(server, oai):
    small_miss, small = _complete(oai, "small")  # B first: nothing of A's can be there yet
    tiny_miss, tiny = _complete(oai, "tiny-llama")
    assert (small_miss, tiny_miss) == ("miss", "miss")  # one prompt, two keys
    assert small != tiny, (small, tiny)
    assert _complete(oai, "small") == ("hit", small)
    assert _complete(oai, "tiny-llama") == ("hit", tiny)
    # Generated again past the response cache, each model gives its own answer again.
    again = {"extra_headers": {"Cache-Control": "no-cache"}}
    assert _complete(oai, "small", **again) == ("miss", small)
    assert _complete(oai, "tiny-llama", **again) == ("miss", tiny)
    rows = _models(server)
    assert rows["small"]["fingerprint"] != rows["tiny-llama"]["fingerprint"]


def _chat(oai, model: str, headers: dict | None = None) -> tuple[str, str, str]:
    raw = oai.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": LONG}], max_tokens=6,
        extra_headers=headers or {})
    return (raw.headers["x-mlxc-cache"], raw.headers["x-mlxc-prefix"],
            raw.parse().choices[0].message.content)


def _reused(prefix: str) -> int:
    return int(prefix.removeprefix("reused=").split("/")[0])


def test_the_prefix_cache_never_serves_one_model_s_blocks_to_the_other(oai):
    status, prefix, tiny = _chat(oai, "tiny-llama")
    assert status == "miss" and prefix.startswith("reused=0/")
    status, prefix, again = _chat(oai, "tiny-llama", {"Cache-Control": "no-cache"})
    assert _reused(prefix) > 100 and again == tiny, prefix  # A's prefix state is stored
    # Model A has this prompt's state now; model B must prefill all of it itself.
    status, prefix, small = _chat(oai, "small")
    assert status == "miss" and prefix.startswith("reused=0/"), prefix
    # B's own state is reused on its next run, and changes nothing in its greedy answer.
    status, prefix, again = _chat(oai, "small", {"Cache-Control": "no-cache"})
    assert status == "miss" and _reused(prefix) > 100 and again == small, prefix


def test_anthropic_aliases_route_to_their_model(ant, oai):
    question = [{"role": "user", "content": FOX}]
    asked = {name: ant.messages.with_raw_response.create(model=name, max_tokens=6,
                                                         messages=question)
             for name in ("small", "tiny-llama", "claude-haiku-4-5", "claude-sonnet-4-5")}
    text = {name: raw.parse().content[0].text for name, raw in asked.items()}
    assert asked["claude-haiku-4-5"].headers["x-mlxc-cache"] == "hit"  # small's answer
    assert text["claude-haiku-4-5"] == text["small"]
    assert text["claude-sonnet-4-5"] == text["tiny-llama"]  # claude-*: the default
    assert asked["claude-haiku-4-5"].parse().model == "claude-haiku-4-5"  # the name echoed


def test_an_unknown_model_is_a_404_in_each_api_s_shape(oai, ant):
    with pytest.raises(openai.NotFoundError) as caught:
        oai.chat.completions.create(model="gpt-9", max_tokens=4,
                                    messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"
    assert "'tiny-llama', 'small'" in caught.value.body["message"]
    with pytest.raises(anthropic.NotFoundError) as caught:
        ant.messages.create(model="llama-9000", max_tokens=4,
                            messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.NotFoundError):
        ant.messages.count_tokens(model="llama-9000",
                                  messages=[{"role": "user", "content": "hi"}])


def test_switching_between_loaded_models_loads_nothing(server, oai):
    for i in range(3):
        for model in ("tiny-llama", "small"):
            oai.completions.create(model=model, prompt=f"{FOX} {i}", max_tokens=2)
    rows = _models(server)
    assert rows["tiny-llama"]["loads"] == rows["small"]["loads"] == 1
    assert rows["small"]["unloads"] == 0 and rows["small"]["weights_bytes"] > 0
    metrics = httpx.get(f"{server}/metrics", headers={"x-api-key": KEY}).text
    assert 'mlxc_model_up{model="small"} 1' in metrics
    assert 'mlxc_model_loads_total{model="small"} 1' in metrics


def test_past_max_models_the_least_recently_used_is_unloaded(tmp_path, tiny_model, second_model):
    running = start_server(tmp_path, tiny_model, "--keepalive", "0.2", "--max-models", "1",
                           "-m", f"a={tiny_model}", "-m", f"b={second_model}")
    url, once = running.url, {"Cache-Control": "no-cache"}
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        first = _complete(client, "a", extra_headers=once)[1]
        # A stream for b, which must load first (a unloaded): keep-alives until it answers.
        with httpx.stream("POST", f"{url}/v1/completions", timeout=120, json={
                "model": "b", "prompt": FOX, "max_tokens": 8, "stream": True}) as stream:
            body = "".join(stream.iter_text())
        assert '"text"' in body and body.rstrip().endswith("data: [DONE]"), body
        rows = _models(url)
        assert rows["a"]["state"] == "unloaded" and rows["a"]["unloads"] == 1
        assert rows["b"]["state"] == "loaded"
        assert _complete(client, "a", extra_headers=once)[1] == first  # loaded again, same
        rows = _models(url)
        assert rows["a"]["loads"] == 2 and rows["b"]["unloads"] == 1
    finally:
        stop_server(running)

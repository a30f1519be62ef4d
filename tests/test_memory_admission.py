"""Memory-aware admission (engine/batch/admission.py), real tiny model: the KV cost per token is
what mlx-lm's caches really allocate; a request that can never fit the limit is refused with
what to change, through the engine and a live server (the real openai and anthropic clients);
requests that fit alone but not together run one after another, first come first served."""

from __future__ import annotations

import threading
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from live_server import mlxc_server
from tiny_model import rescaled_copy

from mlxc.config import load_settings
from mlxc.engine.batch.admission import SAFETY_MIN, STEP, cache_cost, default_limit, measure
from mlxc.engine.worker import Engine
from mlxc.errors import NotEnoughMemory
from mlxc.model.refs import resolve_model
from mlxc.request import GenerationRequest
from mlxc.stream import Delta


@pytest.fixture(scope="module")
def lively(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with sharper logits: answers that differ from prompt to prompt."""
    return rescaled_copy(tiny_model, tmp_path_factory.mktemp("m") / "lively", 4.0)


def make_engine(model: Path, folder: Path, prefix: bool = False, **options) -> Engine:
    """An engine, without a prefix cache unless asked; with `max_kv_memory`, its limit is then
    set from its own measured cost (the activations' figure varies a little between loads)."""
    overrides = {"prefix_block_tokens": 16} if prefix else {
        "prefix_memory_bytes": 0, "prefix_disk_bytes": 0}
    settings = load_settings().with_overrides(
        cache_dir=folder / "cache", model=str(model), **overrides)
    limit = options.pop("max_kv_memory", None)
    engine = Engine(resolve_model(settings.model, settings), settings,
                    max_kv_memory=1 << 30 if limit else None, **options).start()
    engine.wait_loaded()
    if limit:
        engine.memory.limit = limit(engine.memory.cost)
    return engine


@pytest.fixture(scope="module")
def free(lively, tmp_path_factory):
    """An engine with the default (device-derived) limit: far above what these requests need."""
    engine = make_engine(lively, tmp_path_factory.mktemp("free"))
    yield engine
    engine.shutdown(wait=30)


def chat(text: str, max_tokens: int) -> GenerationRequest:
    return GenerationRequest(messages=[{"role": "user", "content": text}], max_tokens=max_tokens)


def test_the_cost_per_token_is_what_the_caches_allocate(free):
    def fed(e, make, lengths):
        """Bytes real caches hold after prefill chunks of 512 and then one token a step."""
        import mlx.core as mx

        out = []
        for n in lengths:
            cache = make(e.model)
            done = 0
            while done < n:
                step = min(512, n - done) if done < n - 40 else 1  # a prefill, then decode
                mx.eval(e.model(mx.array([[5] * step]), cache=cache))
                done += step
            out.append(sum(layer.nbytes for layer in cache))
        return out

    from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache, make_prompt_cache

    def prefill_peak(e, n):
        """Working memory of a real n-token prefill in 512-token chunks, above its KV."""
        import mlx.core as mx

        cache = make_prompt_cache(e.model)
        mx.synchronize()
        before = mx.get_active_memory()
        mx.reset_peak_memory()
        for start in range(0, n, 512):
            e.model(mx.array([[5] * min(512, n - start)]), cache=cache)
            mx.eval([layer.state for layer in cache])
        return mx.get_peak_memory() - before - sum(layer.nbytes for layer in cache)

    cost = free.memory.cost
    args = free.model.args
    head = args.hidden_size // args.num_attention_heads  # float32: k and v, 4 bytes each
    assert cost.per_token == args.num_hidden_layers * args.num_key_value_heads * head * 2 * 4
    # The CPU backend holds every attention score: a chunk needs more the more it attends to
    # (the second chunk of 1000 tokens, 0.6x more on this model).
    assert cost.per_context > 0
    for n in (512, 1000):
        real = free.call(lambda e, n=n: prefill_peak(e, n)).result()
        assert real <= 1.1 * cost.prefill_bytes(n), (n, real)  # peaks vary a few % per run
    lengths = [1, 41, 255, 300, 700, 1100]
    for n, real in zip(lengths, free.call(lambda e: fed(e, make_prompt_cache, lengths)).result(),
                       strict=True):
        assert real <= cost.sequence_bytes(n) <= real + STEP * cost.per_token, n

    def rotating(model):
        return [RotatingKVCache(max_size=64, keep=4) for _ in model.layers]

    windowed = free.call(lambda e: measure(e.model, 512, rotating)).result()
    assert windowed.per_token == 0 and [w for _, w in windowed.windowed] == [64, 64]
    for n, real in zip(lengths, free.call(lambda e: fed(e, rotating, lengths)).result(),
                       strict=True):
        assert real <= windowed.sequence_bytes(n), n
    assert windowed.sequence_bytes(100_000) == windowed.sequence_bytes(1100)  # bounded

    def quantized(_e):  # the tiny model's heads are too narrow to quantize: feed one directly
        import mlx.core as mx

        cache = QuantizedKVCache(group_size=64, bits=8)
        cache.update_and_fetch(mx.ones((1, 2, 300, 64)), mx.ones((1, 2, 300, 64)))
        return cache_cost([cache]), cache.nbytes

    qcost, real = free.call(quantized).result()
    assert real <= qcost.sequence_bytes(300) and qcost.per_token < 2 * 2 * 64 * 4 / 2


def prompts(engine: Engine, *requests: GenerationRequest) -> list[int]:
    return [len(engine.call(lambda e, r=r: e.encode(r)).result()) for r in requests]


def lengths(engine: Engine, *requests: GenerationRequest) -> list[int]:
    """Tokens each request may reach: its prompt and max_tokens."""
    return [n + r.max_tokens for n, r in zip(prompts(engine, *requests), requests, strict=True)]


def test_a_request_that_can_never_fit_is_refused_and_one_that_fits_runs(free, lively,
                                                                         tmp_path):
    small, huge = chat("Hello there", 40), chat("Hello there", 20_000)
    engine = make_engine(lively, tmp_path,
                         max_kv_memory=lambda cost: cost.sequence_bytes(2000) + cost.activations)
    cost, limit = engine.memory.cost, engine.memory.limit
    try:
        with pytest.raises(NotEnoughMemory) as refused:
            engine.submit(huge).result()
        message = str(refused.value)
        assert "max_tokens 20000" in message and "--max-kv-memory" in message
        (prompt,) = prompts(engine, small)
        room = cost.longest_fitting(limit, prompt) - prompt
        assert f"lower max_tokens to at most {room}" in message
        with pytest.raises(NotEnoughMemory):  # one token more does not fit
            engine.submit(chat("Hello there", room + 1)).result()
        fits = engine.submit(chat("Hello there", room))
        for event in fits.events():  # admitted: it decodes (and is left at its first piece)
            assert isinstance(event, Delta), event
            break
        answer = engine.submit(small).result()
        assert answer.text == free.submit(small).result().text
        figures = engine.figures()
        assert figures["kv_memory_limit_bytes"] == limit
        assert figures["kv_memory_reserved_bytes"] == 0 and figures["running"] == 0
    finally:
        engine.shutdown(wait=30)


def test_the_default_limit_is_what_the_weights_leave_less_a_margin():
    gb = 1 << 30
    assert default_limit(100 * gb, 20 * gb) == 75 * gb  # a 5% margin
    assert default_limit(6 * gb, 2 * gb) == 4 * gb - SAFETY_MIN  # at least 512 MB
    assert default_limit(6 * gb, 5.8 * gb) == int(0.1 * gb)  # half of a sliver
    assert default_limit(6 * gb, 7 * gb) == 0 == default_limit(0, 1)  # not checked


def test_off_checks_nothing(lively, tmp_path):
    settings = load_settings().with_overrides(
        cache_dir=tmp_path / "cache", model=str(lively), prefix_memory_bytes=0,
        prefix_disk_bytes=0)
    engine = Engine(resolve_model(settings.model, settings), settings, max_kv_memory=0).start()
    try:
        engine.wait_loaded()
        assert engine.memory.describe() == "not checked (--max-kv-memory off)"
        assert engine.figures()["kv_memory_limit_bytes"] is None
        for event in engine.submit(chat("Hello there", 30_000)).events():
            assert isinstance(event, Delta), event  # admitted (and left at its first piece)
            break
    finally:
        engine.shutdown(wait=30)


def test_requests_that_fit_alone_but_not_together_run_one_after_another(free, lively,
                                                                         tmp_path):
    """A and C fit together, B fits only alone. Queued A, B, C: B waits for A, and C, which
    would fit beside A, does not overtake B; it waits for B in turn. (32-token prefill chunks:
    their activations, counted once per prompt being prefilled, stay small beside the KV;
    the prompts fit one chunk, so the answers are computed as with 512.)"""
    a, b, c = chat("Tell me about the fox", 40), chat("A story, please", 300), chat("Hi", 40)
    la, lb, lc = lengths(free, a, b, c)
    assert all(n - r.max_tokens <= 32 for n, r in zip((la, lb, lc), (a, b, c), strict=True))
    engine = make_engine(lively, tmp_path, prefill_step_size=32, max_kv_memory=lambda cost: max(
        cost.batch_bytes([lb]) + cost.activations,
        cost.batch_bytes([la, lc]) + 2 * cost.activations))
    cost, limit = engine.memory.cost, engine.memory.limit
    assert cost.batch_bytes([la, lb]) + cost.activations > limit  # B fits beside neither
    assert cost.batch_bytes([lb, lc]) + cost.activations > limit
    alone = [free.submit(r).result().text for r in (a, b, c)]
    try:
        gate = threading.Event()
        engine.call(lambda e: gate.wait(30))  # holds the engine while all three queue
        generations = [engine.submit(r) for r in (a, b, c)]
        gate.set()
        assert [g.result().text for g in generations] == alone
        figures = engine.figures()
        assert set(figures["batch_sizes"]) == {1}, figures  # never two at a time
        assert figures["memory_waits"] == 2  # B behind A, then C behind B
        assert figures["kv_memory_reserved_bytes"] == 0
    finally:
        engine.shutdown(wait=30)


def test_the_prefix_cache_gives_its_memory_to_a_request_that_needs_it(free, lively, tmp_path):
    """On a device this request would fill, the memory tier drops blocks first; the answer is
    the same (they are on disk, and a cache never changes an answer)."""
    first = chat("Tell me about the fox and the dog " * 8, 8)
    engine = make_engine(lively, tmp_path, prefix=True)
    try:
        engine.submit(first).result()
        tier = engine.call(lambda e: e.prompt_cache.memory_bytes()).result()
        assert tier > 0
        gate, (prompt,) = engine.memory, prompts(engine, first)
        need = gate.cost.batch_bytes([prompt + first.max_tokens]) + gate.cost.prefill_bytes(prompt)
        # A device where the weights, this request, the tier and the margin overrun by half
        # the tier (the margin is SAFETY_MIN at this size).
        usable = gate.weights + need + SAFETY_MIN + tier - tier // 2
        engine.call(lambda e: setattr(e.memory, "usable", usable)).result()
        assert engine.submit(first).result().text == free.submit(first).result().text
        assert engine.figures()["prefix_memory_shed_bytes"] >= tier - tier // 2
    finally:
        engine.shutdown(wait=30)


def test_a_live_server_refuses_what_never_fits_in_each_api_shape(tmp_path, tiny_model):
    with mlxc_server(tmp_path, tiny_model, "--max-kv-memory", "12MB") as (url, _, log):
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=30)
        messages = [{"role": "user", "content": "a long answer, please"}]
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as refused:
                oai.chat.completions.create(model="default", max_tokens=30_000,
                                            messages=messages, stream=stream)
            error = refused.value.response.json()["error"]
            assert error["code"] == "kv_memory_exceeded" and error["param"] == "max_tokens"
            assert "lower max_tokens" in error["message"], error
        answer = oai.chat.completions.create(model="default", max_tokens=4, messages=messages)
        assert answer.choices[0].finish_reason in ("stop", "length")

        ant = anthropic.Anthropic(base_url=url, api_key="none", max_retries=0, timeout=30)
        with pytest.raises(anthropic.BadRequestError) as refused:
            ant.messages.create(model="default", max_tokens=30_000, messages=messages)
        body = refused.value.response.json()
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
        assert "KV cache" in body["error"]["message"]

        batch = httpx.get(f"{url}/health", timeout=5).json()["batch"]
        assert batch["kv_memory_limit_bytes"] == 12 << 20
        assert batch["kv_memory_reserved_bytes"] == 0
        assert "KV cache up to 12.0 MB" in log.read_text()
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
        assert f"mlxc_kv_memory_limit_bytes {12 << 20}\n" in metrics, metrics


def test_the_measured_costs_are_kept_for_the_next_process(lively, tmp_path):
    """The probe prefills two whole chunks (seconds on a CPU): a later engine of the same
    model reads what the first measured; a damaged file is measured again, never trusted."""
    first = make_engine(lively, tmp_path)
    first.shutdown(wait=30)
    kept = list((tmp_path / "cache" / "measured").glob("*.json"))
    assert len(kept) == 1
    kept[0].write_text(kept[0].read_text().replace('"chunk": 512', '"chunk": 513'))
    again = make_engine(lively, tmp_path)  # another chunk on file: measured again, rewritten
    assert again.memory.cost.chunk == 512 and '"chunk": 512' in kept[0].read_text()
    written = again.memory.cost  # a stopped engine lets go of its memory gate
    again.shutdown(wait=30)
    recalled = make_engine(lively, tmp_path)
    assert recalled.memory.cost == written  # read back exactly as it was written
    recalled.shutdown(wait=30)
    kept[0].write_text("{not json")
    damaged = make_engine(lively, tmp_path)
    assert damaged.memory.cost.chunk == 512 and damaged.memory.cost.per_token > 0
    damaged.shutdown(wait=30)

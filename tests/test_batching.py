"""Continuous batching (engine/batch/scheduler.py) with the real tiny model: answers made together
are complete and the same as alone, one cancelled stream leaves the others running, each
sequence stores and reuses its own prefix state, seeds and penalties hold per sequence."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from tiny_model import rescaled_copy

from mlxc.config import load_settings
from mlxc.engine.worker import Engine
from mlxc.errors import EngineBusy
from mlxc.model.refs import resolve_model
from mlxc.request import GenerationRequest
from mlxc.stream import Delta


@pytest.fixture(scope="module")
def lively(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with sharper logits: answers that differ from prompt to prompt."""
    return rescaled_copy(tiny_model, tmp_path_factory.mktemp("m") / "lively", 4.0)


def make_engine(model: Path, folder: Path, prefix: bool = True, **options) -> Engine:
    # Small blocks: these prompts are shorter than the default 256-token block.
    overrides = {"prefix_block_tokens": 16} if prefix else {
        "prefix_memory_bytes": 0, "prefix_disk_bytes": 0}
    settings = load_settings().with_overrides(
        cache_dir=folder / "cache", model=str(model), **overrides
    )
    engine = Engine(resolve_model(settings.model, settings), settings, **options).start()
    engine.wait_loaded()
    return engine


@pytest.fixture(scope="module")
def engine(lively, tmp_path_factory):
    engine = make_engine(lively, tmp_path_factory.mktemp("e"), prefix=False)
    yield engine
    engine.shutdown(wait=30)


def chat(text: str, **fields) -> GenerationRequest:
    fields.setdefault("max_tokens", 24)
    return GenerationRequest(messages=[{"role": "user", "content": text}], **fields)


PROMPTS = [f"Question {i}: " + "tell me about the fox and the dog " * (i % 4 + 1) for i in range(6)]


def test_answers_made_together_equal_the_same_requests_alone(engine):
    requests = [chat(p) for p in PROMPTS]
    alone = [engine.submit(r).result() for r in requests]
    together = [g.result() for g in [engine.submit(r) for r in requests]]
    assert [a.text for a in together] == [a.text for a in alone]
    assert [a.usage.completion_tokens for a in together] == [
        a.usage.completion_tokens for a in alone
    ]
    assert all(a.finish_reason in ("stop", "length") for a in together)
    figures = engine.figures()
    assert max(figures["batch_sizes"]) > 1, figures  # they really ran in one batch
    assert figures["running"] == figures["waiting"] == 0


def test_a_lone_request_decodes_exactly_as_mlx_lm(engine):
    """Alone, a sequence runs mlx-lm's own loop (batch/lone.py), penalties included."""
    def theirs(e, request):
        import mlx.core as mx
        from mlx_lm import stream_generate

        from mlxc.engine.decode.sampling import build_sampling

        processors = build_sampling(request, e.tokenizer).processors
        return "".join(r.text for r in stream_generate(
            e.model, e.tokenizer, mx.array(e.encode(request)), max_tokens=request.max_tokens,
            logits_processors=processors,
        ))

    for request in (chat(PROMPTS[0]), chat(PROMPTS[1], repetition_penalty=1.5)):
        assert engine.submit(request).result().text == engine.call(
            lambda e, r=request: theirs(e, r)).result()
    assert engine.figures()["running"] == 0


def decoding_alone(engine, request):
    """Submit `request` and return once its text streams (it decodes alone then), with the
    thread that keeps listening (a listener gone would cancel it)."""
    running = engine.submit(request)
    seen = threading.Event()
    watcher = threading.Thread(
        target=lambda: [seen.set() for e in running.events() if isinstance(e, Delta)]
    )
    watcher.start()
    assert seen.wait(30)
    return running, watcher


def test_a_lone_sequence_moves_into_the_batch_when_another_comes_and_back_after(engine):
    first, second = chat(PROMPTS[2], max_tokens=300), chat(PROMPTS[3], max_tokens=30)
    alone = [engine.submit(r).result().text for r in (first, second)]
    running, watcher = decoding_alone(engine, first)
    before = dict(engine.figures()["batch_sizes"])
    back = engine.figures()["back_alone"]
    joined = engine.submit(second)
    assert [running.result().text, joined.result().text] == alone
    watcher.join(30)
    after = engine.figures()
    assert after["batch_sizes"].get(2, 0) > before.get(2, 0)  # they decoded together
    assert after["back_alone"] > back  # the long one went back to the lone loop after


def test_requests_that_come_together_while_one_decodes_join_it(engine):
    """Sent together while another decodes, they are prefilled together beside it and all
    four decode in one batch; every answer is the one each gets alone."""
    first, others = chat(PROMPTS[4], max_tokens=200), [chat(p) for p in PROMPTS[:3]]
    alone = [engine.submit(r).result().text for r in (first, *others)]
    running, watcher = decoding_alone(engine, first)
    fours = engine.figures()["batch_sizes"].get(4, 0)
    together = [engine.submit(r) for r in others]
    assert [running.result().text, *(g.result().text for g in together)] == alone
    watcher.join(30)
    assert engine.figures()["batch_sizes"].get(4, 0) > fours


def test_requests_sent_together_to_an_idle_engine_are_prefilled_together(
    lively, tmp_path, monkeypatch
):
    """An idle engine waits a sliver of a lone prefill for company (worker.COMPANY_WAIT_*), so
    the first of requests sent a moment apart is not prefilled alone ahead of the others:
    all get their first token in the same step."""
    from mlxc.engine import worker

    # The tiny model prefills in a few ms: stretch the sliver to cover the sends below.
    monkeypatch.setattr(worker, "COMPANY_WAIT_SHARE", 200.0)
    monkeypatch.setattr(worker, "COMPANY_WAIT_MAX", 2.0)
    engine = make_engine(lively, tmp_path, prefix=False)
    try:
        engine.submit(chat(PROMPTS[5], max_tokens=2)).result()  # a lone prefill, measured
        firsts: dict[int, float] = {}

        def follow(i: int, generation) -> None:
            for event in generation.events():
                if isinstance(event, Delta):
                    firsts.setdefault(i, time.perf_counter())

        threads = []
        for i in range(4):
            generation = engine.submit(chat(PROMPTS[i], max_tokens=8))
            threads.append(threading.Thread(target=follow, args=(i, generation)))
            threads[-1].start()
            time.sleep(0.025)
        for thread in threads:
            thread.join(30)
        assert len(firsts) == 4
        assert max(firsts.values()) - min(firsts.values()) < 0.04  # sent 75 ms apart in all
    finally:
        engine.shutdown(wait=30)


def test_cancelling_one_stream_leaves_the_others_running(engine):
    long = [chat(p, max_tokens=200) for p in PROMPTS[:3]]
    alone = [engine.submit(r).result() for r in long]
    generations = [engine.submit(r) for r in long]
    for event in generations[1].events():  # leave after the first piece of text
        if isinstance(event, Delta):
            break
    answers = [g.result() for i, g in enumerate(generations) if i != 1]
    assert [a.text for a in answers] == [alone[0].text, alone[2].text]
    assert generations[1].cancelled.is_set()
    assert generations[1].done.wait(10)
    stopped = generations[1].result()
    assert stopped.finish_reason == "cancelled" and stopped.usage.completion_tokens < 200
    assert engine.queue_depth == 0


def test_seeds_and_penalties_hold_per_sequence(engine):
    seeded = chat(PROMPTS[0], temperature=1.0, seed=7, max_tokens=20)
    penalised = chat(PROMPTS[1], repetition_penalty=1.5, presence_penalty=0.5, max_tokens=20)
    alone = [engine.submit(r).result().text for r in (seeded, penalised)]
    others = [chat(p, temperature=1.0, seed=i, max_tokens=20) for i, p in enumerate(PROMPTS[2:])]
    generations = [engine.submit(r) for r in (seeded, *others, penalised)]
    together = [g.result().text for g in generations]
    assert [together[0], together[-1]] == alone
    assert engine.submit(seeded).result().text == alone[0]  # and again: the key is per request
    different = engine.submit(chat(PROMPTS[0], temperature=1.0, seed=8, max_tokens=20)).result()
    assert different.text != alone[0]


def test_each_sequence_stores_and_reuses_its_prefix_state(lively, tmp_path):
    engine = make_engine(lively, tmp_path)
    try:
        firsts = [g.result() for g in [engine.submit(chat(p)) for p in PROMPTS[:3]]]
        follows = [
            GenerationRequest(messages=[
                {"role": "user", "content": p}, {"role": "assistant", "content": a.text},
                {"role": "user", "content": "And then?"},
            ], max_tokens=12)
            for p, a in zip(PROMPTS[:3], firsts, strict=True)
        ]
        again = [g.result() for g in [engine.submit(r) for r in follows]]
        for first, follow in zip(firsts, again, strict=True):  # whole blocks of the first turn
            assert follow.usage.cached_tokens >= first.usage.prompt_tokens - 16
    finally:
        engine.shutdown(wait=30)
    cold = make_engine(lively, tmp_path / "cold", prefix=False)
    try:  # reuse never changes an answer
        assert [cold.submit(r).result().text for r in follows] == [a.text for a in again]
    finally:
        cold.shutdown(wait=30)


def test_a_full_queue_refuses_with_a_retry_time(lively, tmp_path):
    engine = make_engine(lively, tmp_path, prefix=False, max_batch=1, max_queue=0)
    try:
        running = engine.submit(chat(PROMPTS[0], max_tokens=400))  # the only place
        with pytest.raises(EngineBusy) as refused:
            engine.submit(chat(PROMPTS[1], max_tokens=2))
        assert refused.value.retry_after >= 1
        assert running.result().finish_reason in ("stop", "length")
        assert engine.submit(chat(PROMPTS[1], max_tokens=2)).result()  # room again
    finally:
        engine.shutdown(wait=30)

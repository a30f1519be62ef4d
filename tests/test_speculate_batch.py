"""Speculation inside the continuous batch (engine/batch/speculative.py) on the real default
model: several requests at once, some drafting (Predicted Outputs: drafts the model takes),
some not (chat, a forced tool call, a seeded sampled one), with a stop string inside an
accepted run, max_tokens inside one, penalties and logprobs: the same answers as without
speculation, and each finished sequence's state (what the prefix cache stores) holds the same
tokens and keys/values as the plain decode's."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlxc.request import GenerationRequest

WEATHER = [{"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
DRAFTED = [  # prompts whose plain answers become their predictions
    "Repeat exactly: the fox jumps over the dog, the fox jumps over the dog, the fox jumps.",
    "List the numbers from 1 to 20, separated by commas.",
    "Write a Python function that adds two numbers.",
    "Explain how rainbows form.",
]


def chat(text: str, **fields) -> GenerationRequest:
    fields.setdefault("max_tokens", 40)
    return GenerationRequest(messages=[{"role": "user", "content": text}], **fields)


def burst(engine, requests: list[GenerationRequest]) -> list:
    """Submitted together: they are prefilled as one burst and decode in one batch."""
    return [g.result() for g in [engine.submit(r) for r in requests]]


def recording(engine) -> list:
    """Record each state a finished sequence hands the prefix cache: (tokens it holds, its
    keys and values per layer), copied on the engine thread."""
    seen: list = []

    def wrap(eng):
        store = eng.prompt_cache.store

        def recorded(tokens, cache, *args, **kwargs):
            held = cache[0].offset
            arrays = [(np.array(c.keys[..., :held, :]), np.array(c.values[..., :held, :]))
                      for c in cache]
            seen.append((list(tokens[:held]), arrays))
            return store(tokens, cache, *args, **kwargs)

        eng.prompt_cache.store = recorded
        return store

    return seen, engine.call(wrap).result()


def unwrap(engine, store) -> None:
    engine.call(lambda eng: setattr(eng.prompt_cache, "store", store)).result()


def test_a_mixed_batch_speculates_and_answers_as_without(speculation_engines):
    plain, spec = speculation_engines
    free = burst(plain, [chat(p) for p in DRAFTED])  # what each answers: its prediction
    said = [a.text for a in free]
    stop = said[0][len(said[0]) // 2 :][:8]  # a stop string halfway through a predicted run
    requests = [
        chat(DRAFTED[0], stop=[stop]),
        chat(DRAFTED[1], max_tokens=23),  # ends inside a predicted run
        chat(DRAFTED[2], repetition_penalty=1.1, logprobs=True, top_logprobs=2),
        chat(DRAFTED[3]),
        chat("What is the capital of France?", max_tokens=24),  # chat: nothing to draft
        chat("Call the weather tool for Paris.", tools=WEATHER, tool_choice="required",
             max_tokens=30),  # a grammar: never drafts
        chat("Say hello.", max_tokens=20, temperature=0.8, seed=7),  # seeded: never drafts
    ]
    predicted = [r.model_copy(update={"prediction": said[i]}) if i < len(said) else r
                 for i, r in enumerate(requests)]
    seen_plain, plain_store = recording(plain)
    seen_spec, spec_store = recording(spec)
    before = spec.call(lambda eng: eng.scheduler.speculation.steps).result()
    try:
        want, got = burst(plain, requests), burst(spec, predicted)
    finally:
        unwrap(plain, plain_store)
        unwrap(spec, spec_store)
    for w, g in zip(want, got, strict=True):
        assert g.text == w.text
        assert (g.finish_reason, g.stop_sequence) == (w.finish_reason, w.stop_sequence)
        assert g.usage.completion_tokens == w.usage.completion_tokens
        assert g.tool_calls == w.tool_calls
    assert got[0].finish_reason == "stop" and got[0].stop_sequence == stop
    assert got[0].usage.accepted_tokens > 0  # the stop came inside drafts it took
    assert got[1].finish_reason == "length" and got[1].usage.accepted_tokens > 0
    assert [e["token"] for e in got[2].logprobs] == [e["token"] for e in want[2].logprobs]
    for w, g in zip(want[2].logprobs, got[2].logprobs, strict=True):
        assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-3)
    assert got[5].usage.drafted_tokens == got[6].usage.drafted_tokens == 0
    assert spec.call(lambda eng: eng.scheduler.speculation.steps).result() > before

    # each state kept is a plain decode's: the same tokens, the same keys and values
    assert sorted(t for t, _ in seen_spec) == sorted(t for t, _ in seen_plain)
    by_tokens = {tuple(t): arrays for t, arrays in seen_plain}
    for tokens, arrays in seen_spec:
        for (k, v), (pk, pv) in zip(arrays, by_tokens[tuple(tokens)], strict=True):
            assert k.shape == pk.shape
            np.testing.assert_allclose(k, pk, atol=1e-4, rtol=1e-3)
            np.testing.assert_allclose(v, pv, atol=1e-4, rtol=1e-3)


def test_rows_cut_on_their_own_hold_what_a_plain_decode_holds(speculation_engines):
    """Two rows of different lengths fed a 4-position block, keeping 1 and 3 of it: each row
    extracted equals a plain cache fed the same tokens, and the next step's logits match."""
    _, spec = speculation_engines

    def run(engine):
        from mlx_lm.models.cache import BatchKVCache, make_prompt_cache

        from mlxc.engine.batch.speculative import _keep_per_row

        model, encode = engine.model, engine.tokenizer.encode
        prompts = [encode("The fox jumps over the dog."), encode("Paris is a city")]
        width = max(map(len, prompts))
        caches = [BatchKVCache([width - len(p) for p in prompts]) for _ in model.layers]
        model(mx.array([[0] * (width - len(p)) + p for p in prompts]), cache=caches)
        block = [[11, 12, 13, 14], [21, 22, 23, 24]]
        model(mx.array(block), cache=caches)
        kept = [1, 3]
        _keep_per_row(caches, [4 - n for n in kept])
        after = model(mx.array([[5], [6]]), cache=caches)[:, -1]
        for row, prompt in enumerate(prompts):
            fed = prompt + block[row][: kept[row]]
            own = make_prompt_cache(model)
            model(mx.array([fed]), cache=own)
            single = model(mx.array([[5 + row]]), cache=own)[0, -1]
            assert mx.allclose(after[row], single, atol=1e-3, rtol=1e-3).item()
            for layer, mine in zip(caches, own, strict=True):
                got = layer.extract(row)
                assert got.offset == mine.offset == len(fed) + 1
                for x, y in ((got.keys, mine.keys), (got.values, mine.values)):
                    assert mx.allclose(x, y[..., : mine.offset, :], atol=1e-4, rtol=1e-3).item()
        return True

    assert spec.call(run).result()


def test_sampled_rows_speculate_in_the_batch(speculation_engines):
    """Sampled, unseeded rows with predictions take their runs by rejection sampling beside a
    greedy row: each answer keeps its length limit, and the greedy one is unchanged."""
    plain, spec = speculation_engines
    greedy = chat(DRAFTED[1], max_tokens=24)
    said = plain.submit(greedy).result().text
    sampled = [chat(DRAFTED[1], max_tokens=24, temperature=0.7, top_p=0.9, prediction=said)
               for _ in range(2)]
    before = spec.call(lambda eng: eng.scheduler.speculation.steps).result()
    answers = burst(spec, [greedy.model_copy(update={"prediction": said}), *sampled])
    assert answers[0].text == said
    assert all(a.usage.completion_tokens <= 24 for a in answers)
    assert sum(a.usage.drafted_tokens for a in answers[1:]) > 0
    assert spec.call(lambda eng: eng.scheduler.speculation.steps).result() > before

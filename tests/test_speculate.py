"""Speculative decoding (engine/decode/speculate.py) on the real default model: greedy answers
are the same with and without it, alone and in a batch of concurrent requests; a stop string
inside an accepted run stops where it would; verify + trim leaves the KV a plain decode makes;
Predicted Outputs through the official openai client against a real `mlxc serve`."""

from __future__ import annotations

from pathlib import Path

import httpx
import openai
import pytest
from live_server import start_server, stop_server

from mlxc.request import GenerationRequest

SOURCE = (Path(__file__).parent.parent / "mlxc" / "engine" / "decode" / "stops.py").read_text()
EDIT = f"Here is a file:\n```python\n{SOURCE}```\nGive it back with a docstring on feed()."
PROMPTS = [
    "Repeat exactly: the fox jumps over the dog, the fox jumps over the dog, the fox jumps.",
    "List the numbers from 1 to 20, separated by commas.",
    "What is the capital of France?",
    "Copy this line three times: alpha beta gamma delta.",
    "Write a Python function that adds two numbers.",
    "Say hello.",
]


def chat(text: str, **fields) -> GenerationRequest:
    fields.setdefault("max_tokens", 32)
    return GenerationRequest(messages=[{"role": "user", "content": text}], **fields)


def test_greedy_answers_are_the_same_alone(speculation_engines):
    plain, spec = speculation_engines
    requests = [chat(p) for p in PROMPTS] + [chat(EDIT, max_tokens=64)]
    want = [plain.submit(r).result() for r in requests]
    got = [spec.submit(r).result() for r in requests]
    assert [a.text for a in got] == [a.text for a in want]
    assert [a.finish_reason for a in got] == [a.finish_reason for a in want]
    assert all(a.usage.drafted_tokens == 0 for a in want)
    assert sum(a.usage.accepted_tokens for a in got) > 10  # it did speculate, and gained


def test_greedy_answers_are_the_same_in_a_batch(speculation_engines):
    """Several at once: they move between the lone loop (speculating) and the batch."""
    plain, spec = speculation_engines
    requests = [chat(p, max_tokens=24) for p in PROMPTS[:4]]
    want = [plain.submit(r).result().text for r in requests]
    first = spec.submit(chat(EDIT, max_tokens=48))  # alone first, then joined by the others
    got = [g.result().text for g in [spec.submit(r) for r in requests]]
    assert got == want
    assert first.result().text == plain.submit(chat(EDIT, max_tokens=48)).result().text


def test_stop_string_inside_an_accepted_run(speculation_engines):
    plain, spec = speculation_engines
    request = chat(PROMPTS[0], max_tokens=40, stop=["dog. The fox"])
    want, got = plain.submit(request).result(), spec.submit(request).result()
    assert got.text == want.text and got.finish_reason == want.finish_reason == "stop"
    assert got.stop_sequence == "dog. The fox"
    assert got.usage.completion_tokens == want.usage.completion_tokens


def test_prediction_is_no_part_of_the_key():
    plain = chat("hi")
    assert plain.cache_key("f") == plain.model_copy(update={"prediction": "x"}).cache_key("f")


def test_trimmed_kv_equals_the_plain_decodes(speculation_engines):
    """Verify a draft whose second half is wrong, trim the rejected part: the cache holds the
    same tokens (offset) and the same keys/values as feeding the taken tokens one by one."""
    _, spec = speculation_engines

    def run(engine):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

        from mlxc.engine.decode.speculate import accepted_run, verify

        model = engine.model
        prompt = engine.tokenizer.encode("The fox jumps over the dog. The fox jumps over")
        plain, spec_cache = make_prompt_cache(model), make_prompt_cache(model)
        model(mx.array([prompt[:-1]]), cache=plain)
        model(mx.array([prompt[:-1]]), cache=spec_cache)
        token, greedy = prompt[-1], []
        for _ in range(6):  # the plain decode: one token at a time
            logits = model(mx.array([[token]]), cache=plain)
            token = mx.argmax(logits[0, -1]).item()
            greedy.append(token)
        draft = greedy[:3] + [(t + 1) % 1000 for t in greedy[3:5]]  # 3 right, 2 wrong
        best, _ = verify(model, spec_cache, mx.array([prompt[-1]]), draft)
        taken = accepted_run(draft, best)
        trim_prompt_cache(spec_cache, len(draft) - taken)
        assert taken == 3 and best[taken] == greedy[3]
        trim_prompt_cache(plain, 6 - (taken + 1))  # plain fed the prompt's last + 5 tokens
        for a, b in zip(plain, spec_cache, strict=True):
            assert a.offset == b.offset
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                n = a.offset  # what is held; past it, buffer space the next step overwrites
                assert mx.allclose(x[..., :n, :], y[..., :n, :], atol=1e-4, rtol=1e-3).item()
        return True

    assert spec.call(run).result()


@pytest.fixture(scope="module")
def oai(smollm_folder, tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("serve"), smollm_folder)
    try:
        yield openai.OpenAI(base_url=f"{running.url}/v1", api_key="none", max_retries=0,
                            timeout=300)
    finally:
        stop_server(running)


def test_predicted_outputs_through_the_openai_client(oai):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    plain = oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=32,
                                        temperature=0)
    predicted = oai.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=32, temperature=0, extra_headers={
            "Cache-Control": "no-cache"},
        prediction={"type": "content", "content": plain.choices[0].message.content})
    assert predicted.choices[0].message.content == plain.choices[0].message.content
    details = predicted.usage.completion_tokens_details
    assert details.accepted_prediction_tokens > 0
    assert details.rejected_prediction_tokens >= 0
    health = httpx.get(str(oai.base_url).removesuffix("/").removesuffix("/v1") + "/health")
    speculation = health.json()["batch"]["speculation"]
    assert speculation["accepted"] > 0 and 0 < speculation["acceptance_rate"] <= 1
    with pytest.raises(openai.BadRequestError) as refused:
        oai.chat.completions.create(model="smollm2", messages=messages, max_tokens=8,
                                    temperature=0.7, seed=1, prediction={"type": "content",
                                                                         "content": "x"})
    assert refused.value.param == "prediction"
    with pytest.raises(openai.BadRequestError):
        oai.completions.create(model="smollm2", prompt="hi", max_tokens=4,
                               extra_body={"prediction": {"type": "content", "content": "hi"}})

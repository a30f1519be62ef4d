"""`ignore_eos` (vLLM's extension, sent by guidellm, vLLM's benchmark script, genai-perf and
llmperf): the answer runs to max_tokens past the model's end tokens, on chat completions and
completions, alone and in the batch; stop strings still stop; requests without it keep their
cache keys. A real `mlxc serve` on a tiny model that ends every chat answer at once, driven
by the official openai client."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import httpx
import openai
import pytest
from live_server import start_server, stop_server

from mlxc.request import GenerationRequest

MODEL = "ends-at-once"
HI = [{"role": "user", "content": "hi"}]
IGNORE = {"ignore_eos": True}


@pytest.fixture(scope="module")
def ends_at_once(tiny_model, tmp_path_factory) -> Path:
    """The tiny model with its end token's embedding 1.5x the newline's: the tied output layer
    then prefers the end token wherever the model would write a newline (after a chat
    prompt's "assistant\\n", and after the end token itself)."""
    import mlx.core as mx
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("m") / MODEL
    shutil.copytree(tiny_model, folder, ignore=shutil.ignore_patterns(".mlxc-fingerprint.json"))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    (newline,) = tokenizer.encode("\n", add_special_tokens=False)
    weights = mx.load(str(tiny_model / "model.safetensors"))
    embed = weights["model.embed_tokens.weight"]
    embed[tokenizer.eos_token_id] = embed[newline] * 1.5
    mx.save_safetensors(str(folder / "model.safetensors"), weights, {"format": "mlx"})
    return folder


@pytest.fixture(scope="module")
def server(ends_at_once, tmp_path_factory):
    running = start_server(tmp_path_factory.mktemp("serve"), ends_at_once, "--max-batch", "4")
    try:
        yield running.url
    finally:
        stop_server(running)


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=120)


def test_chat_runs_to_max_tokens_past_the_end_token(oai):
    plain = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=12)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens == 0
    done = oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=12,
                                       extra_body=IGNORE)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 12
    assert done.choices[0].message.content == ""  # end tokens show no text (no <|im_end|>)
    chunks = list(oai.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=12,
        extra_body=IGNORE, stream=True, stream_options={"include_usage": True}))
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 12


def test_completions_run_to_max_tokens_and_stop_strings_still_stop(oai):
    plain = oai.completions.create(model=MODEL, prompt="hi\n", max_tokens=10)
    assert plain.choices[0].finish_reason == "stop" and plain.usage.completion_tokens == 0
    done = oai.completions.create(model=MODEL, prompt="hi\n", max_tokens=10, extra_body=IGNORE)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 10
    free = oai.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10,
                                  extra_body=IGNORE)
    said = free.choices[0].text
    assert free.choices[0].finish_reason == "length" and len(said) > 4, said
    cut = oai.completions.create(model=MODEL, prompt="The quick brown fox", max_tokens=10,
                                 stop=[said[2:4]], extra_body=IGNORE)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == said[:2]


def test_in_the_batch_too(oai, server):
    """Requests sent together decode in one batch, where mlx-lm's BatchGenerator would let a
    sequence go at its end token."""
    answers: list = [None] * 4
    start = threading.Barrier(len(answers))

    def ask(i: int) -> None:
        start.wait()
        answers[i] = oai.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"hi {i}"}], max_tokens=160,
            extra_body=IGNORE)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(answers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [(a.choices[0].finish_reason, a.usage.completion_tokens) for a in answers] == [
        ("length", 160)] * len(answers)
    sizes = httpx.get(f"{server}/health", timeout=10).json()["batch"]["batch_sizes"]
    assert any(int(size) > 1 for size in sizes), sizes  # they really ran in one batch


def test_a_structured_answer_with_ignore_eos_is_refused(oai):
    with pytest.raises(openai.BadRequestError, match="ignore_eos"):
        oai.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, extra_body=IGNORE,
                                    response_format={"type": "json_object"})


def test_ignore_eos_is_keyed_and_keys_without_it_are_unchanged():
    fp = "f" * 64
    chat = GenerationRequest(messages=[{"role": "user", "content": "What is MLX?"}])
    completion = GenerationRequest(prompt="The quick", max_tokens=16, stop=["."],
                                   logprobs=True, top_logprobs=2)
    # The keys these requests had before ignore_eos existed.
    assert chat.cache_key(fp) == "cd492d69f15283ee568b69b6f22f9c21c59ad9017adb6e472c3ca7201f85aa8c"
    assert completion.cache_key(fp) == (
        "3e6c4173d1a07f17b7703c4827f964c8d49401c5e7eac192b6f227a9fefd3ea5")
    assert chat.model_copy(update={"ignore_eos": False}).cache_key(fp) == chat.cache_key(fp)
    assert chat.model_copy(update={"ignore_eos": True}).cache_key(fp) != chat.cache_key(fp)

"""Log-probabilities through a real `mlxc serve` and the official openai client: chat's
`logprobs`/`top_logprobs`, completions' `logprobs`/`echo` (lm-eval's log-likelihood requests,
token-id prompts), streamed and replayed from the response cache, checked against a direct
computation with mlx-lm on the same tiny model."""

from __future__ import annotations

import math

import openai
import pytest
from live_server import served  # noqa: F401  (fixture)

from mlxc.model.blas import load_optimised_blas

load_optimised_blas()  # before MLX is imported, as the engine does
PROMPT = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="module")
def client(served) -> openai.OpenAI:  # noqa: F811
    url, _env = served
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def direct(tiny_model):
    """The prompt's log-probabilities computed here with mlx-lm: (token ids, per token)."""
    import mlx.core as mx
    from mlx_lm import load

    model, tokenizer = load(str(tiny_model))
    ids = tokenizer.encode(PROMPT)
    logits = model(mx.array(ids)[None])[0].astype(mx.float32)
    rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = [rows[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    return ids, picked


def test_chat_greedy_token_is_the_top_logprob(client):
    answer = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Paris is the capital of"}],
        max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
    )
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens > 0
    for item in content:
        assert len(item.top_logprobs) == 3
        assert item.token == item.top_logprobs[0].token
        assert item.logprob == pytest.approx(item.top_logprobs[0].logprob, abs=1e-6)
        assert item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert bytes(item.bytes).decode("utf-8", "replace") == item.token
    again = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Paris is the capital of"}],
        max_tokens=6, temperature=0, logprobs=True, top_logprobs=3,
    )
    assert again.choices[0].logprobs == answer.choices[0].logprobs  # a hit keeps them
    plain = client.chat.completions.create(
        model="default", messages=[{"role": "user", "content": "Paris is the capital of"}],
        max_tokens=6, temperature=0,
    )
    assert plain.choices[0].logprobs is None
    assert plain.choices[0].message.content == answer.choices[0].message.content


def test_chat_stream_carries_logprobs_also_when_replayed(client):
    def streamed() -> tuple[str, list]:
        text, items = "", []
        for chunk in client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "Name a colour."}],
            max_tokens=5, temperature=0, logprobs=True, stream=True,
        ):
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
                items += chunk.choices[0].logprobs.content
        return text, items

    first, second = streamed(), streamed()  # the second is a cache hit
    assert first[1] and [i.logprob for i in first[1]] == [i.logprob for i in second[1]]
    assert first[0] == second[0]


def test_echo_with_no_tokens_scores_the_prompt_like_mlx_lm(client, direct):
    ids, picked = direct
    for prompt in (PROMPT, ids):  # text, then the same prompt as token ids
        answer = client.completions.create(
            model="default", prompt=prompt, max_tokens=0, echo=True, logprobs=1, temperature=0,
        )
        choice = answer.choices[0]
        assert choice.text == PROMPT
        lp = choice.logprobs
        assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None
        assert lp.top_logprobs[0] is None
        assert math.isclose(sum(lp.token_logprobs[1:]), sum(picked), rel_tol=1e-4)
        assert lp.token_logprobs[1:] == pytest.approx(picked, abs=1e-3)
        assert lp.text_offset[1] == len(lp.tokens[0])
        for token_lp, top in zip(lp.token_logprobs[1:], lp.top_logprobs[1:], strict=True):
            assert len(top) == 1 and max(top.values()) >= token_lp - 1e-6


def test_echo_with_generation_appends_the_answer(client):
    answer = client.completions.create(
        model="default", prompt=PROMPT, max_tokens=3, echo=True, logprobs=0, temperature=0,
    )
    choice = answer.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text
    assert len(lp.tokens) == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert all(top is None for top in lp.top_logprobs)  # logprobs=0: no alternatives


def test_what_cannot_be_honoured_is_refused(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}],
            logprobs=True, top_logprobs=21,
        )
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt=PROMPT, max_tokens=0)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt=PROMPT, echo=True, stream=True)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="default", prompt=[10**9], max_tokens=1)

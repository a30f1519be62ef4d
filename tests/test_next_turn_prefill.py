"""The idle next-turn prefill: after an answer, an idle engine prefills what the chat template
puts before the user's next message, so the follow-up reuses it (from memory and, after a
restart, from disk) and still answers as a cold prefill does. The real SmolLM2: a random
model's answers are not valid text, so they never re-tokenize to the same tokens and the
template's opening cannot be placed after them."""

from __future__ import annotations

import prefix_helpers as helpers
from prefix_helpers import ask, conversation, flush, service

from mlxc.model.blas import load_optimised_blas
from mlxc.request import Answer, GenerationRequest
from mlxc.service import Service

load_optimised_blas()

lively, cold = helpers.lively, helpers.cold  # the same fixtures


def _answer_then_idle(svc: Service) -> tuple[Answer, list[dict], int]:
    """Turn 1, the engine's idle work after it, and turn 2's messages; also the tokens said."""
    first = ask(svc, conversation("What is the capital of France?"), max_tokens=12)
    svc.engine().wait_idle()
    assert first.finish_reason == "stop"
    follow = conversation("What is the capital of France?", first.text, "And of Italy?")
    return first, follow, first.usage.prompt_tokens + first.usage.completion_tokens


def test_an_idle_server_prefills_the_next_turns_opening(smollm_folder, cold, tmp_path):
    with service(smollm_folder, tmp_path, next_turn_prefill=True) as svc:
        first, follow, said = _answer_then_idle(svc)
        flush(svc)
        assert svc.prefix_stats()["writes_skipped"] == 0
        second = ask(svc, follow, max_tokens=12)
        first_turn = conversation("What is the capital of France?")
        again = ask(svc, first_turn, max_tokens=12)
    # The template's `<|im_end|>`, newline, `<|im_start|>user`, newline came from the cache.
    assert second.usage.cached_tokens == said + 5
    assert second.text == cold(smollm_folder, follow, max_tokens=12)
    # A request that is not the guessed next turn trims the guess off.
    assert again.text == first.text == cold(smollm_folder, first_turn, max_tokens=12)


def test_a_request_that_comes_at_once_goes_ahead_of_the_idle_work(smollm_folder, cold, tmp_path):
    question = "What is the capital of France?"
    with service(smollm_folder, tmp_path, next_turn_prefill=True) as svc:
        first = ask(svc, conversation(question), max_tokens=12)
        follow = conversation(question, first.text, "And of Italy?")
        second = ask(svc, follow, max_tokens=12)  # within the grace: nothing was fed meanwhile
    said = first.usage.prompt_tokens + first.usage.completion_tokens
    # The end token the answer stopped at is in the state too (the batch feeds it).
    assert second.usage.cached_tokens == said + (first.finish_reason == "stop")
    assert second.text == cold(smollm_folder, follow, max_tokens=12)


def test_the_next_turns_opening_is_written_to_disk(smollm_folder, cold, tmp_path):
    with service(smollm_folder, tmp_path, next_turn_prefill=True) as svc:
        _first, follow, said = _answer_then_idle(svc)
    with service(smollm_folder, tmp_path) as svc:  # after a restart
        second = ask(svc, follow, max_tokens=12)
        assert svc.prefix_stats()["disk_hits"] == 1
    assert second.usage.cached_tokens == said + 5
    assert second.text == cold(smollm_folder, follow, max_tokens=12)


def test_next_turn_opening_is_what_the_template_puts_before_a_user_message(lively):
    from transformers import AutoTokenizer

    from mlxc.engine.kv.turns import next_turn_opening

    tokenizer = AutoTokenizer.from_pretrained(lively)
    request = GenerationRequest(messages=conversation("Why?"))
    text = tokenizer.apply_chat_template(
        conversation("Why?"), add_generation_prompt=True, tokenize=False
    )
    said = tokenizer.encode(text + "Because.", add_special_tokens=False)
    opening = next_turn_opening(tokenizer, request, "Because.", said)
    assert tokenizer.decode(opening) == "<|im_end|>\n<|im_start|>user\n"
    assert next_turn_opening(tokenizer, request, "Something else.", said) == []
    assert next_turn_opening(tokenizer, GenerationRequest(prompt="Why?"), "x", said) == []

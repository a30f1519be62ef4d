"""Draft-model speculation (`--draft-model`, engine/decode/draft_model.py) on the real default
model: the drafts come from models this file cuts from SmolLM2-135M itself (some of its layers,
its head and the very same tokenizer files), and from SmolLM2 as its own draft. Greedy answers
are the same with a draft model as without, alone and in a batch; a self-draft's drafts are
taken; a draft whose tokenizer differs is refused at load, naming both models; after a rejected
draft the draft cache holds exactly the taken tokens and gives a cold prefill's logits."""

from __future__ import annotations

import pytest
from draft_maker import layers_copy, vocab_changed_copy

from mlxc.config import ConfigError, load_settings
from mlxc.engine.decode.speculate import StepCosts
from mlxc.errors import ModelError
from mlxc.request import GenerationRequest

PROMPTS = [
    "Repeat exactly: the fox jumps over the dog, the fox jumps over the dog, the fox jumps.",
    "List the numbers from 1 to 20, separated by commas.",
    "Write a Python function that adds two numbers.",
]
DRAFT_LAYERS = [0, 1, 2, 3, *range(24, 30)]  # 10 of SmolLM2's 30: its first and last ones


def chat(text: str, **fields) -> GenerationRequest:
    fields.setdefault("max_tokens", 16)
    return GenerationRequest(messages=[{"role": "user", "content": text}], **fields)


def _engine(folder, cache_dir, **overrides):
    from mlxc.engine.worker import Engine
    from mlxc.model.refs import resolve_model

    settings = load_settings().with_overrides(
        cache_dir=cache_dir, model=str(folder), prefix_memory_bytes=0, prefix_disk_bytes=0,
        **overrides)
    engine = Engine(resolve_model(settings.model, settings), settings).start()
    engine.wait_loaded()
    return engine


@pytest.fixture(scope="module")
def draft_folder(smollm_folder, tmp_path_factory):
    return layers_copy(smollm_folder, tmp_path_factory.mktemp("draft") / "smollm2-10", DRAFT_LAYERS)


@pytest.fixture(scope="module")
def engines(smollm_folder, draft_folder, tmp_path_factory):
    """plain (--speculate off), cut (a 10-layer draft, --speculate draft), self (SmolLM2 as
    its own draft)."""
    made = {
        "plain": _engine(smollm_folder, tmp_path_factory.mktemp("off"), speculate="off"),
        "cut": _engine(smollm_folder, tmp_path_factory.mktemp("cut"), speculate="draft",
                       draft_model=str(draft_folder)),
        "self": _engine(smollm_folder, tmp_path_factory.mktemp("self"), speculate="draft",
                        draft_model=str(smollm_folder)),
    }
    yield made
    for engine in made.values():
        engine.shutdown(wait=30)


@pytest.fixture(scope="module")
def plain_answers(engines):
    return [engines["plain"].submit(chat(p)).result() for p in PROMPTS]


def test_greedy_answers_are_the_same_with_a_draft_model(engines, plain_answers):
    for name in ("cut", "self"):
        got = [engines[name].submit(chat(p)).result() for p in PROMPTS]
        assert [a.text for a in got] == [a.text for a in plain_answers], name
        assert [a.finish_reason for a in got] == [a.finish_reason for a in plain_answers]
        drafted = sum(a.usage.drafted_tokens for a in got)
        assert drafted > 0, name  # it did draft
        if name == "self":  # the model drafts for itself: its drafts are its own choices
            assert sum(a.usage.accepted_tokens for a in got) >= 0.9 * drafted
    speculation = engines["cut"].figures()["speculation"]
    assert set(speculation["sources"]) == {"draft"}  # --speculate draft, alone: the model only
    assert speculation["draft_model"]["name"] == str(engines["cut"].settings.draft_model)
    assert speculation["draft_model"]["ms_per_drafted_token"] > 0  # measured, for the gate


def test_greedy_answers_are_the_same_in_a_batch(engines, plain_answers):
    """Several at once: the first drafts alone, then all decode in the batch (prompt lookup
    there), and the last one comes back to the lone loop, its draft cache caught up."""
    spec = engines["cut"]
    first = spec.submit(chat(PROMPTS[2], max_tokens=32))
    others = [spec.submit(chat(p)) for p in PROMPTS[:2]]
    assert [g.result().text for g in others] == [a.text for a in plain_answers[:2]]
    assert first.result().text == engines["plain"].submit(chat(PROMPTS[2], max_tokens=32)) \
        .result().text


def test_sampled_requests_draft_and_finish(engines):
    """Unseeded sampled requests speculate by rejection sampling over the greedy draft (a
    point mass, as prompt lookup's: tests/test_speculate_sampled.py tests the sampler)."""
    cut = engines["cut"]
    # Its measured costs (~half a step a drafted token here, the prompt's catch-up, slow verify
    # passes) stop its drafts; a draft model whose costs are not known yet is tried.
    def unmeasured(engine):  # the passes' costs too: the earlier tests' on a loaded machine
        engine.draft.seconds_per_token = engine.draft.seconds_per_prefilled = None
        engine.scheduler.step_costs = StepCosts()

    cut.call(unmeasured).result()
    answer = cut.submit(chat(PROMPTS[1], temperature=0.7, max_tokens=64)).result()
    assert answer.usage.completion_tokens == 64 or answer.finish_reason == "stop"
    assert answer.usage.drafted_tokens > 0


def test_the_draft_cache_is_cut_back_exactly(engines):
    """Draft 5 tokens, say the target took 2: the draft cache then holds the sequence's tokens
    and those 2, and the logits after its next token equal a cold prefill's."""

    def run(engine):
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        from mlxc.engine.decode.draft_model import DraftSequence

        draft = engine.draft
        tokens = engine.tokenizer.encode("The fox jumps over the dog. The fox jumps over")
        seq = DraftSequence(draft)
        drafted = seq.propose(tokens[:-1], tokens[-1], 5)
        assert len(drafted) == 5
        seq.verified(5, 2)
        held = [*tokens, *drafted[:2]]
        assert seq.fed == held
        assert all(c.offset == len(held) for c in seq.cache)
        after = drafted[2] + 1  # any token: what the target took instead of the third draft
        warm = draft.model(mx.array([[after]]), cache=seq.cache)[0, -1]
        cold = draft.model(mx.array([[*held, after]]), cache=make_prompt_cache(draft.model))[0, -1]
        assert mx.allclose(warm, cold, atol=1e-4, rtol=1e-3).item()
        # and it drafts on from there as a fresh one would
        seq.fed.append(after)
        fresh = DraftSequence(draft)
        again = seq.propose([*held, after], drafted[0], 3)
        assert again == fresh.propose([*held, after], drafted[0], 3)
        return True

    assert engines["cut"].call(run).result()


def test_a_draft_with_another_tokenizer_is_refused(engines, smollm_folder, tiny_model,
                                                   tmp_path):
    from mlxc.engine.load import load_draft

    plain = engines["plain"]
    swapped = vocab_changed_copy(smollm_folder, tmp_path / "swapped")
    for draft, says in ((tiny_model, "vocabularies of 49152 and"),
                        (swapped, "token ids mean different strings")):
        settings = plain.settings.with_overrides(speculate="draft", draft_model=str(draft))
        error = plain.call(lambda e, s=settings: load_draft(e.ref, e.tokenizer, s, print))
        with pytest.raises(ModelError) as refused:
            error.result()
        message = str(refused.value)
        assert says in message and str(draft) in message and plain.ref.name in message
        assert "--draft-model" in message


def test_speculate_draft_needs_a_draft_model():
    with pytest.raises(ConfigError, match="--draft-model"):
        load_settings().with_overrides(speculate="draft")

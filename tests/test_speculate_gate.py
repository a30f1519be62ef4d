"""The drafter's cost gate (engine/decode/speculate.py): drafts are made only where the tokens
a pass is expected to yield beat the pass's measured cost in plain steps."""

from __future__ import annotations

import pytest

from mlxc.engine.decode.speculate import Drafter, StepCosts, expected_tokens

PROMPT = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10] * 3


def costs(plain: float, fixed: float, per_token: float) -> StepCosts:
    c = StepCosts()
    c.saw_plain(plain)
    for k in (2, 6, 12, 4, 8):
        c.saw_verify(k, fixed + per_token * k)
    return c


def test_the_cost_line_is_fitted_from_passes_of_several_lengths():
    c = costs(plain=0.080, fixed=0.086, per_token=0.007)  # SmolLM2-135M on this CPU
    assert c.ratio(1) == pytest.approx(93 / 80, rel=0.01)
    assert c.ratio(12) == pytest.approx(170 / 80, rel=0.01)


def test_expected_tokens_of_a_draft():
    assert expected_tokens(0.0, 8) == 1.0  # only the model's own token
    assert expected_tokens(1.0, 8) == 9.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


def test_a_cpu_drafts_only_where_drafts_are_taken_and_a_gpu_at_lower_acceptance():
    cpu, gpu = costs(0.080, 0.086, 0.007), costs(0.005, 0.0052, 0.00004)
    for drafter_costs, drafts_at_low in ((cpu, False), (gpu, True)):
        low = Drafter(PROMPT, None, ngram=True, costs=drafter_costs)
        for _ in range(4):
            low.verified(4, 0)  # drafts that miss at once
        assert (low.best_length(100) > 0) is drafts_at_low
        high = Drafter(PROMPT, None, ngram=True, costs=drafter_costs)
        for _ in range(4):
            high.verified(8, 8)
        assert high.best_length(100) >= 8


def test_a_sequence_whose_drafts_stop_paying_rests_then_looks_again():
    d = Drafter(PROMPT, None, ngram=True, costs=costs(0.080, 0.086, 0.007))
    draft = d.propose(1, 50)  # ... 9, 10, 1: the prompt goes on with 2, 3, ...
    assert draft and draft == PROMPT[1 : 1 + len(draft)]
    for _ in range(4):
        d.verified(4, 0)
    assert d.propose(1, 50) == [] and d.pause > 0
    assert d.best_length(50) > 0  # after the pause, the acceptance is back at its prior


def test_a_draft_model_starts_only_where_the_answer_left_wins_back_its_prefill(tiny_model):
    """A sequence's first draft feeds the draft model the whole prompt: charged at its
    measured rate, it must be won back over the tokens still to come."""
    from mlx_lm import load

    from mlxc.engine.decode.draft_model import DraftModel, DraftSequence

    model, _ = load(str(tiny_model))
    draft = DraftModel(model, "tiny")
    draft.saw(1, 0.002)  # a drafted token: 0.04 plain steps
    draft.saw_prefill(100, 1.0)  # a caught-up token: 0.2 plain steps
    plain = costs(0.050, 0.052, 0.0005)
    prompt = list(range(3, 203))  # 200 tokens: 40 plain steps to catch up
    sequence = DraftSequence(draft)
    sequence._taken, sequence._trials = 9.0, 10.0  # drafts mostly taken: ~3x a pass
    assert sequence.behind(prompt) == 201
    assert sequence.best_length(16, plain, prompt) == 0  # 16 tokens cannot pay 40 steps
    assert sequence.best_length(500, plain, prompt) > 0  # 500 can
    assert sequence.best_length(16, plain) > 0  # nothing to catch up: the pass alone decides
    sequence.propose(prompt, 5, 4)  # caught up: the next draft feeds only the new tokens
    assert sequence.behind([*prompt, 5, *sequence.fed[201:]]) <= 2
    assert sequence.best_length(16, plain, sequence.fed) > 0


def test_passes_timed_without_a_plain_step_pause_drafting_to_time_one():
    """Where every step finds a draft, no two plain steps in a row would ever be timed and the
    gate would judge by its prior for good: the drafter steps plain to measure one."""
    from mlxc.engine.decode.speculate import PLAIN_PROBE

    c = StepCosts()
    c.saw_verify(4, 0.020)
    d = Drafter(PROMPT, None, ngram=True, costs=c)
    assert d.propose(1, 50) == [] and d.pause == PLAIN_PROBE
    c.saw_plain(0.004)  # measured: the gate decides by the two again
    d.pause = 0
    assert d.propose(1, 50) == [] and d.pause > PLAIN_PROBE  # 5x a step: drafts do not pay
    assert c.describe()["plain_step_ms"] == 4.0


def test_a_sequence_drafted_at_every_step_still_times_plain_steps(tiny_model, tmp_path):
    """A prediction that is the whole answer finds a draft at every step; the engine's gate
    must still measure a plain step (the /health figure), and the answer is the plain one."""
    from mlxc.config import load_settings
    from mlxc.engine.worker import Engine
    from mlxc.model.refs import resolve_model
    from mlxc.request import GenerationRequest

    answers = {}
    for mode in ("off", "auto"):
        settings = load_settings().with_overrides(
            cache_dir=tmp_path / mode, model=str(tiny_model), speculate=mode,
            prefix_memory_bytes=0, prefix_disk_bytes=0)
        engine = Engine(resolve_model(settings.model, settings), settings).start()
        try:
            engine.wait_loaded()
            request = GenerationRequest(
                messages=[{"role": "user", "content": "Count on and on."}], max_tokens=64,
                ignore_eos=True, prediction=answers.get("off"))
            answers[mode] = engine.submit(request).result().text
            figures = engine.figures()["speculation"]
        finally:
            engine.shutdown(wait=30)
    assert answers["auto"] == answers["off"]
    assert figures["drafted"] > 0
    assert figures["step_costs"]["plain_step_ms"] > 0


def test_a_resting_drafter_looks_again_when_the_answer_copies_its_prompt_again():
    """A pause grown long would miss a copy that resumes (an edit given back past its changed
    lines): a plain step whose last tokens recur in the prompt ends it; others count it down."""
    d = Drafter(PROMPT, None, ngram=True, costs=costs(0.080, 0.086, 0.007))
    d.pause = 200
    d.rested([50, 51, 52, 53])  # nothing the sequence said before
    assert d.pause == 199
    d.rested([99, 3, 4, 5, 6])  # ... 3, 4, 5, 6 is in the prompt
    assert d.pause == 0

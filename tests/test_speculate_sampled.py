"""Speculation for sampled requests (engine/decode/rejection.py): the emitted tokens follow the
target's distribution, and the engine path honours what a sampled request asks for.

The method: on an 8-token vocabulary with hand-made logits for k+1 = 4 positions and a fixed
draft, 20,000 independent draws (one call, leading dimension; and 3,000 separate calls of the
chunked form the engine uses) are compared with the exact target p by total
variation distance: the first emitted token with p_0, the second (given the first was the
draft's) with p_1, and so on, the bonus token with p_3. The bound is 1.5 x sqrt(V / n), several
times the expected distance of n draws from their own distribution; the test shows that wrong
algorithms (always accept, resample from p instead of the residual, greedy verification) and
a wrong target (no temperature, no top-p, the temperature before top-p) are further than twice
the bound from p, from their exact distributions. The keys are fixed: the same result every
run.
"""

from __future__ import annotations

import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from mlxc.engine.decode.rejection import rejection_sample, sampling_weights
from mlxc.request import GenerationRequest

V, N = 8, 20_000
PROBS = np.array([  # the model's probabilities at the k+1 positions (before the filters)
    [0.05, 0.45, 0.30, 0.10, 0.05, 0.03, 0.01, 0.01],  # the draft (2) is not the argmax
    [0.02, 0.03, 0.05, 0.60, 0.20, 0.05, 0.03, 0.02],  # the draft (3) is
    [0.27, 0.24, 0.20, 0.12, 0.08, 0.045, 0.025, 0.02],  # top-p 0.9 cuts 5, 6, 7
    [0.10, 0.10, 0.10, 0.30, 0.10, 0.10, 0.10, 0.10],  # the bonus position
])
DRAFT = [2, 3, 1]
FILTERED_OUT = [2, 3, 6]  # 6 is cut by top-p: never accepted
TARGET = sampling_weights(0.8, top_p=0.9)  # as a request with temperature 0.8, top_p 0.9


def bound(n: int) -> float:
    return 1.5 * math.sqrt(V / n)


def tv(a: np.ndarray, b: np.ndarray) -> float:
    return 0.5 * float(np.abs(a - b).sum())


def target() -> np.ndarray:
    logprobs = mx.array(np.log(PROBS).astype(np.float32))
    return np.array(mx.softmax(TARGET(logprobs), axis=-1))


def draws(draft: list[int], n: int = N, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    weights = TARGET(mx.array(np.log(PROBS).astype(np.float32)))
    accepted, token = rejection_sample(mx.broadcast_to(weights, (n, *weights.shape)),
                                       mx.array(draft), key=mx.random.key(seed))
    return np.array(accepted), np.array(token)


def emitted(accepted: np.ndarray, token: np.ndarray, draft: list[int], i: int) -> np.ndarray:
    """The i-th emitted token of the draws that emitted one there (the first i drafts taken)."""
    reached = accepted >= i
    return np.where(accepted[reached] > i, draft[i] if i < len(draft) else -1, token[reached])


def empirical(tokens: np.ndarray) -> np.ndarray:
    return np.bincount(tokens, minlength=V) / len(tokens)


def test_the_target_is_mlx_lms_own_sampler():
    """The weights are what mlx-lm's make_sampler draws from: top-p on the untempered
    probabilities, then the temperature; either one left out, or the other order, is not."""
    from mlx_lm.sample_utils import apply_top_p, make_sampler

    row = np.array([0.30, 0.20, 0.15, 0.12, 0.08, 0.07, 0.05, 0.03])
    logprobs = mx.array(np.log(row[None]).astype(np.float32))
    sampler_draws = np.array(make_sampler(0.5, top_p=0.7)(mx.broadcast_to(logprobs, (N, V))))
    p = np.array(mx.softmax(sampling_weights(0.5, top_p=0.7)(logprobs), axis=-1))[0]
    assert tv(empirical(sampler_draws), p) < bound(N)
    assert list(np.nonzero(p)[0]) == [0, 1, 2, 3]  # top-p keeps 0.77 of the mass
    others = {
        "no temperature": mx.softmax(apply_top_p(logprobs, 0.7), axis=-1),
        "no top-p": mx.softmax(logprobs / 0.5, axis=-1),
        "temperature first": mx.softmax(apply_top_p(logprobs / 0.5, 0.7), axis=-1),
    }
    for name, q in others.items():
        assert tv(np.array(q)[0], p) > 2 * bound(N), name


def test_each_emitted_token_follows_the_target():
    p = target()
    accepted, token = draws(DRAFT)
    for i in range(len(DRAFT) + 1):
        tokens = emitted(accepted, token, DRAFT, i)
        assert len(tokens) > 500  # enough draws reach each position
        assert tv(empirical(tokens), p[i]) < bound(len(tokens)), i
    # all three accepted about as often as the draft's probabilities say
    assert abs((accepted == 3).mean() - p[0, 2] * p[1, 3] * p[2, 1]) < 0.01


def test_a_filtered_out_draft_is_never_taken():
    p = target()
    accepted, token = draws(FILTERED_OUT, seed=1)
    assert accepted.max() == 2
    third = emitted(accepted, token, FILTERED_OUT, 2)
    assert tv(empirical(third), p[2]) < bound(len(third))


def test_the_lone_loops_chunked_calls():
    """As the engine calls it (`sample_run`: one draft, positions decided in chunks of 1, 2,
    4, mlx's global generator), 3,000 separate calls: the same distributions."""
    from mlxc.engine.decode.rejection import sample_run

    logprobs = mx.array(np.log(PROBS).astype(np.float32))
    mx.random.seed(0)
    runs = [sample_run(logprobs, DRAFT, TARGET) for _ in range(3000)]
    accepted, token = np.array([a for a, _ in runs]), np.array([t for _, t in runs])
    p = target()
    for i in range(len(DRAFT) + 1):
        tokens = emitted(accepted, token, DRAFT, i)
        assert len(tokens) > 150
        assert tv(empirical(tokens), p[i]) < bound(len(tokens)), i


def test_wrong_algorithms_would_fail():
    """The exact first-token distributions of wrong algorithms are further from p than the
    bound the right one meets (so the tests above can tell them apart)."""
    p = target()
    d = DRAFT[0]
    point = np.eye(V)[d]
    wrong = {
        "always accept": point,
        "resample from p": p[0, d] * point + (1 - p[0, d]) * p[0],
    }
    for name, q in wrong.items():
        assert tv(q, p[0]) > 2 * bound(N), name
    # greedy verification (take the draft iff it is the argmax): the second position's draft
    # is its argmax, so it is always taken
    assert tv(np.eye(V)[DRAFT[1]], p[1]) > 2 * bound(int(N * p[0, d]))


# The engine path, on the real default model.

SOURCE = (Path(__file__).parent.parent / "mlxc" / "engine" / "decode" / "stops.py").read_text()
EDIT = f"Here is a file:\n```python\n{SOURCE}```\nGive it back unchanged."
FOX = "Repeat exactly: the fox jumps over the dog, the fox jumps over the dog, the fox jumps."


def sampled(text: str, **fields) -> GenerationRequest:
    fields = {"temperature": 0.8, "top_p": 0.9, "max_tokens": 32, **fields}
    return GenerationRequest(messages=[{"role": "user", "content": text}], **fields)


def test_sampled_requests_speculate_and_honour_max_tokens(speculation_engines):
    _, spec = speculation_engines
    answers = [spec.submit(sampled(EDIT, max_tokens=40)).result(),
               spec.submit(sampled(FOX, max_tokens=40, prediction=FOX[16:])).result()]
    edit = answers[0]
    assert edit.text.strip() and edit.finish_reason == "length"
    assert edit.usage.completion_tokens == 40
    drafted = sum(a.usage.drafted_tokens for a in answers)
    accepted = sum(a.usage.accepted_tokens for a in answers)
    assert edit.usage.drafted_tokens > 0 and 0 <= accepted <= drafted
    speculation = spec.figures()["speculation"]
    assert speculation["drafted"] >= drafted and speculation["accepted"] >= accepted


def test_sampled_stop_strings(speculation_engines):
    """Stop strings end a speculating sampled answer as they end a plain one (" the" comes
    in almost any English answer, but a sampled one may end first; five tries)."""
    _, spec = speculation_engines
    for _ in range(5):
        answer = spec.submit(sampled(FOX, max_tokens=40, stop=[" the"])).result()
        if answer.stop_sequence is not None:
            break
    assert answer.finish_reason == "stop" and answer.stop_sequence == " the"
    assert " the" not in answer.text and answer.usage.completion_tokens < 40


def test_a_seeded_request_gives_its_answer_with_speculation_on_or_off(speculation_engines):
    plain, spec = speculation_engines
    request = sampled(FOX, max_tokens=24, seed=7)
    first, second = spec.submit(request).result(), spec.submit(request).result()
    assert first.text == second.text == plain.submit(request).result().text
    assert first.usage.drafted_tokens == 0  # seeded: decoded plain (rejection.py says why)


def test_greedy_with_a_repetition_penalty_speculates_and_keeps_its_answer(speculation_engines):
    """Penalties are applied position by position over the draft, with the plain decode's
    context at each: the greedy answer cannot change."""
    plain, spec = speculation_engines
    request = GenerationRequest(messages=[{"role": "user", "content": EDIT}], max_tokens=32,
                                repetition_penalty=1.1, presence_penalty=0.2)
    want, got = plain.submit(request).result(), spec.submit(request).result()
    assert got.text == want.text
    assert got.usage.drafted_tokens > 0

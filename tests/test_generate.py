"""The token loop (engine/decode/generate.py) against mlx-lm's own: the same greedy tokens for the
same prompt, whatever the chunking; logits processors see the whole prompt even when most of
it came from the prefix cache; the state holds exactly the tokens that were fed."""

from __future__ import annotations

import pytest
from tiny_model import rescaled_copy

from mlxc.model.blas import load_optimised_blas

load_optimised_blas()  # before MLX is imported, as the engine does


@pytest.fixture(scope="module")
def loaded(tiny_model, tmp_path_factory):
    from mlx_lm import load

    folder = rescaled_copy(tiny_model, tmp_path_factory.mktemp("m") / "lively", 4.0)
    return load(str(folder))


def prompt_of(tokenizer, n: int) -> list[int]:
    """n prompt tokens, none of them an end token."""
    usable = [t for t in range(3, len(tokenizer)) if t not in tokenizer.eos_token_ids]
    return [usable[(i * 37) % len(usable)] for i in range(n)]


def ours(model, tokenizer, prompt, reused=0, cache=None, processors=(), max_tokens=12, step=512,
         last_only=True):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from mlxc.engine.decode.generate import generate_tokens

    cache = make_prompt_cache(model) if cache is None else cache
    steps = list(generate_tokens(
        model, tokenizer, prompt, reused, cache, sampler=make_sampler(0.0),
        logits_processors=list(processors), max_tokens=max_tokens, prefill_step_size=step,
        last_only=last_only,
    ))
    return steps, cache


def test_the_last_position_shortcut_is_checked_and_exact_enough(loaded):
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from mlxc.engine.decode.generate import last_position_logits, supports_last_position_logits

    model, tokenizer = loaded
    assert supports_last_position_logits(model)
    tokens = mx.array([prompt_of(tokenizer, 50)])
    full = model(tokens, cache=make_prompt_cache(model))
    last = last_position_logits(model, tokens, make_prompt_cache(model))
    assert last.shape == (1, 1, full.shape[-1])
    assert mx.allclose(full[:, -1:, :], last, atol=1e-4).item()
    assert "model" not in vars(model)  # the swap is undone: the inner network is back
    assert not supports_last_position_logits(object())  # no inner network: mlx-lm's way


@pytest.mark.parametrize("last_only", [True, False])
@pytest.mark.parametrize("length", [1, 40, 513, 700])
def test_greedy_tokens_and_text_equal_mlx_lm_stream_generate(loaded, length, last_only):
    import mlx.core as mx
    from mlx_lm import stream_generate
    from mlx_lm.sample_utils import make_sampler

    model, tokenizer = loaded
    prompt = prompt_of(tokenizer, length)
    theirs = list(stream_generate(
        model, tokenizer, mx.array(prompt), max_tokens=12, sampler=make_sampler(0.0),
        prefill_step_size=512,
    ))
    mine, _ = ours(model, tokenizer, prompt, last_only=last_only)
    assert [s.token for s in mine] == [r.token for r in theirs]
    assert "".join(s.text for s in mine) == "".join(r.text for r in theirs)
    assert mine[-1].finish_reason == theirs[-1].finish_reason
    assert all(s.finish_reason is None for s in mine[:-1])


def test_logits_processors_see_the_whole_prompt_when_a_prefix_was_reused(loaded):
    """A repetition penalty looks at the last prompt tokens: the cached part counts too, or
    an exact repeat (one token left to feed) would be penalised differently from cold."""
    from mlx_lm.models.cache import make_prompt_cache

    model, tokenizer = loaded
    prompt = prompt_of(tokenizer, 90)
    seen: list[list[int]] = []

    def recorder(tokens, logits):
        seen.append(tokens.tolist())
        return logits

    cache = make_prompt_cache(model)
    ours(model, tokenizer, prompt[:89], cache=cache, max_tokens=1)  # a state for 89 tokens
    assert cache[0].offset == 89  # its only answer token was never fed
    steps, _ = ours(model, tokenizer, prompt, reused=89, cache=cache, processors=[recorder],
                    max_tokens=3)
    first = steps[0].token
    assert seen[0] == prompt
    assert seen[1] == prompt + [first]


def test_the_state_holds_every_fed_token_and_nothing_more(loaded):
    model, tokenizer = loaded
    prompt = prompt_of(tokenizer, 30)
    steps, cache = ours(model, tokenizer, prompt, max_tokens=5)
    fed = len(prompt) + len(steps) - 1  # the last token handed out was never fed
    assert all(layer.offset == fed for layer in cache)
    # A follow-up on that state equals a cold run of the same tokens.
    follow = prompt + [s.token for s in steps[:-1]] + prompt_of(tokenizer, 7)
    warm, _ = ours(model, tokenizer, follow, reused=fed, cache=cache)
    cold, _ = ours(model, tokenizer, follow)
    assert [s.token for s in warm] == [s.token for s in cold]

"""The compiled decode step (engine/cuda/compiled_decode.py): with the real tiny model and
mlx-lm's own BatchGenerator, a batch decoded through it gives the same greedy tokens as
mlx-lm's step (and a lone sequence's, through mlx-lm's generate_step, too), while requests
join and leave and while the buffers grow past 256 positions;
a model its stand-in caches do not fit falls back to mlx-lm's step. The engine turns it on
on CUDA only, but it runs anywhere, so these tests run on the CPU too."""

from __future__ import annotations

import pytest
from batch_decode import decode
from tiny_model import rescaled_copy

from mlxc.config import ConfigError, load_settings
from mlxc.engine.cuda import small_rows
from mlxc.engine.cuda.compiled_decode import CompiledDecode, for_model


@pytest.fixture(scope="module")
def lively_model(tiny_model, tmp_path_factory):
    from mlx_lm import load

    model, tokenizer = load(str(rescaled_copy(tiny_model, tmp_path_factory.mktemp("m") / "l", 4.0)))
    return model, tokenizer


def prompts_of(tokenizer):
    texts = ["the fox jumps", "a long way home, said the old sailor to the",
             "one two three four five six seven", "rain"]
    return [tokenizer.encode(t) for t in texts]


def test_a_compiled_batch_decodes_what_mlx_lm_decodes(lively_model):
    model, tokenizer = lively_model
    prompts = prompts_of(tokenizer)
    lengths = [12, 20, 7, 16]  # they leave at different steps: the batch shrinks
    join = [(tokenizer.encode("late comer"), 9), (prompts[1][:5], 14)]
    want = decode(model, prompts, lengths, join)
    compiled = CompiledDecode(model)
    got = decode(compiled, prompts, lengths, join)
    assert compiled.failed is None
    assert compiled.steps > 10  # it ran the decode steps, not mlx-lm's
    assert got == want
    assert [len(t) for t in got] == lengths + [9, 14]


def test_it_grows_its_buffers_past_256_positions(lively_model):
    model, tokenizer = lively_model
    long = (tokenizer.encode("the fox jumps over the lazy dog ") * 40)[:245]
    prompts = [long, long[:200]]  # 245 + 30 crosses a 256-position buffer
    want = decode(model, prompts, [30, 30])
    compiled = CompiledDecode(model)
    assert decode(compiled, prompts, [30, 30]) == want
    assert compiled.failed is None and compiled.steps >= 29


def lone_tokens(model, prompt, count):
    """Greedy tokens of one sequence through mlx-lm's own lone loop (`generate_step`, a
    plain KVCache per layer), as engine/batch/lone.py decodes a sequence that is alone."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    steps = generate_step(mx.array(prompt), model, max_tokens=count)
    return [int(token) for token, _ in steps]


def test_a_lone_sequence_s_step_runs_compiled_with_mlx_lm_s_tokens(lively_model):
    """A lone step is a batch of one row over mlx-lm's KVCache: the same tokens as mlx-lm's
    step, past a 256-position buffer (a prompt of 245 and 30 more), with a prompt whose cache
    is exactly its length (no spare room) and one that has some."""
    model, tokenizer = lively_model
    long = (tokenizer.encode("the fox jumps over the lazy dog ") * 40)[:245]
    for prompt, count in ((long, 30), (prompts_of(tokenizer)[1], 20)):
        want = lone_tokens(model, prompt, count)
        compiled = CompiledDecode(model)
        assert lone_tokens(compiled, prompt, count) == want
        assert compiled.failed is None
        assert compiled.lone_steps == compiled.steps >= count - 2  # the prefill is mlx-lm's
        assert compiled.figures()["compiled_decode"]["lone_steps"] == compiled.lone_steps


def test_a_model_its_stand_ins_do_not_fit_gets_mlx_lm_s_step(lively_model):
    """A model that reads its cache's state (the stand-ins have none) fails to trace once;
    from then on every step is mlx-lm's, and the answers are the same."""
    model, tokenizer = lively_model

    class ReadsState:
        def __init__(self, model):
            self.model = model
            self.layers = model.layers

        def __call__(self, inputs, cache=None):
            if cache:
                _ = cache[0].state
            return self.model(inputs, cache=cache)

    prompts = prompts_of(tokenizer)[:2]
    want = decode(model, prompts, [8, 8])
    compiled = CompiledDecode(ReadsState(model))
    assert decode(compiled, prompts, [8, 8]) == want
    assert "state" in compiled.failed and compiled.steps == 0


def test_the_setting_and_where_it_is_on(monkeypatch, lively_model):
    model, _ = lively_model
    assert load_settings().compiled_decode
    assert isinstance(for_model(model, True), CompiledDecode) == small_rows.usable()
    assert for_model(model, False) is model
    monkeypatch.setenv("MLXC_COMPILED_DECODE", "off")
    assert not load_settings().compiled_decode
    monkeypatch.setenv("MLXC_COMPILED_DECODE", "sometimes")
    with pytest.raises(ConfigError, match="MLXC_COMPILED_DECODE"):
        load_settings()


def test_it_keeps_a_few_shapes_compiled_and_says_what_it_did(lively_model, monkeypatch):
    """Batch sizes and buffer lengths each make a shape; past KEPT_SHAPES the least recently
    used is dropped and traced again when it comes back, with the same tokens."""
    from mlxc.engine.cuda import compiled_decode

    model, tokenizer = lively_model
    monkeypatch.setattr(compiled_decode, "KEPT_SHAPES", 2)
    prompts = prompts_of(tokenizer)
    want = decode(model, prompts, [12, 9, 6, 3])  # batch sizes 4, 3, 2, 1: 4 shapes
    compiled = CompiledDecode(model)
    assert decode(compiled, prompts, [12, 9, 6, 3]) == want
    assert compiled.traces == 4 and len(compiled._shapes) == 2
    assert decode(compiled, prompts, [12, 9, 6, 3]) == want  # dropped ones traced again
    figures = compiled.figures()["compiled_decode"]
    assert figures["traces"] == 8 and figures["steps"] == compiled.steps and not figures["failed"]
    assert figures["trace_seconds"] > 0


def test_a_model_that_attends_past_its_rows_is_caught_by_the_first_step(lively_model,
                                                                         monkeypatch):
    """A model whose attention ignores the stand-ins' bounds (as one calling mx.fast's
    attention itself, with no mask, would) reads padding and stale positions: the first
    compiled step's logits differ from the model's, and from then on every step is mlx-lm's."""
    import mlx.core as mx

    from mlxc.engine.cuda import compiled_decode

    def unbounded(original):
        def attention(queries, keys, values, cache, scale, mask, sinks=None):
            return mx.fast.scaled_dot_product_attention(queries, keys, values, scale=scale,
                                                        mask=mask)
        return attention

    model, tokenizer = lively_model
    prompts = prompts_of(tokenizer)
    want = decode(model, prompts, [10, 6, 8, 4])
    monkeypatch.setattr(compiled_decode, "_attention", unbounded)
    compiled = CompiledDecode(model)
    assert decode(compiled, prompts, [10, 6, 8, 4]) == want
    assert "off the model's" in compiled.failed and compiled.steps == 0


def test_the_engine_with_it_answers_as_alone_and_keeps_states_that_reuse_right(tiny_model,
                                                                               tmp_path):
    """Through the engine's own scheduler (switched to the compiled step here, as on CUDA):
    requests decoded together give their lone answers, and the states the batch hands back
    for follow-ups (cut out of its padded buffers) give a cold engine's answers."""
    from test_batching import PROMPTS, chat, make_engine

    from mlxc.request import GenerationRequest

    lively = rescaled_copy(tiny_model, tmp_path / "lively", 4.0)

    def switch(engine):
        engine.batch_model = CompiledDecode(engine.model)
        engine.scheduler.batch = engine.scheduler._new_batch()
        return engine.batch_model

    engine = make_engine(lively, tmp_path / "e")
    try:
        compiled = engine.call(switch).result()
        requests = [chat(p) for p in PROMPTS[:4]]
        alone = [engine.submit(r).result().text for r in requests]
        firsts = [g.result() for g in [engine.submit(r) for r in requests]]
        assert [a.text for a in firsts] == alone
        assert compiled.steps > 0 and compiled.failed is None
        assert compiled.lone_steps > 0  # the lone answers ran compiled too
        follows = [GenerationRequest(messages=[
            {"role": "user", "content": p}, {"role": "assistant", "content": a.text},
            {"role": "user", "content": "And then?"}], max_tokens=12)
            for p, a in zip(PROMPTS[:4], firsts, strict=True)]
        again = [g.result() for g in [engine.submit(r) for r in follows]]
        assert all(a.usage.cached_tokens > 0 for a in again)
    finally:
        engine.shutdown(wait=30)
    cold = make_engine(lively, tmp_path / "cold", prefix=False)
    try:
        assert [cold.submit(r).result().text for r in follows] == [a.text for a in again]
    finally:
        cold.shutdown(wait=30)

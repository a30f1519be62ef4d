"""engine/batch/generator.py: mlx-lm's BatchGenerator that hands a prompt batch over without a
copy when all of it leaves to decode. With the real tiny model, it decodes the same greedy
tokens as mlx-lm's own, whether all prompts finish together (no copy) or some stay behind
for more chunks (mlx-lm's copy), with sequences joining a running batch."""

from __future__ import annotations

import pytest
from batch_decode import decode
from mlx_lm.generate import PromptProcessingBatch
from tiny_model import rescaled_copy

from mlxc.engine.batch.generator import Batch


@pytest.fixture(scope="module")
def lively_model(tiny_model, tmp_path_factory):
    from mlx_lm import load

    return load(str(rescaled_copy(tiny_model, tmp_path_factory.mktemp("m") / "l", 4.0)))


@pytest.mark.parametrize("step, copies", [(512, False), (4, True)])
def test_it_decodes_what_mlx_lm_decodes_and_copies_only_what_stays(
    lively_model, monkeypatch, step, copies
):
    model, tokenizer = lively_model
    texts = ["the fox jumps", "a long way home, said the old sailor to the", "rain", "one two"]
    prompts = [tokenizer.encode(t) for t in texts]
    join = [(tokenizer.encode("late comer at the door"), 9), (prompts[1][:5], 6)]
    lengths = [12, 20, 7, 16]
    want = decode(model, prompts, lengths, join, prefill_step=step)
    made = []
    original = PromptProcessingBatch._copy
    monkeypatch.setattr(PromptProcessingBatch, "_copy",
                        lambda self: made.append(len(self)) or original(self))
    got = decode(model, prompts, lengths, join, kind=Batch, prefill_step=step)
    assert got == want
    assert [len(t) for t in got] == lengths + [9, 6]
    # One prefill chunk (512): every prompt is in at once, and the batch leaves whole.
    # Chunks of 4: the short prompts leave while the long ones stay, and are copied out.
    assert bool(made) is copies

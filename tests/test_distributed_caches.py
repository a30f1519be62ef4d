"""Which cache layers a sharded server keeps in step (distributed/shard.py MIRRORED_CACHES):
a sliding-window model's RotatingKVCache layers batch on 2 ranks as in one process; a model
with any other layer (here mamba's recurrent ArraysCache) is refused at start, clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_distributed_batch import at_once, serving
from tiny_model import rescaled_copy

from mlxc.distributed.shard import ShardingError, check_caches


@pytest.fixture(scope="module")
def sliding_llama(tiny_model, tmp_path_factory) -> Path:
    """The tiny llama's shape with its first layer a 32-token sliding window (mlx-lm's
    RotatingKVCache): the test prompts are far longer, so the window rolls."""
    window = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 32}
    return rescaled_copy(tiny_model, tmp_path_factory.mktemp("m") / "sliding", 4.0, window)


def test_a_sliding_window_model_batches_on_two_ranks_as_in_one_process(
        tmp_path, sliding_llama):
    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.utils import load_model

    model, _ = load_model(sliding_llama, lazy=True)
    assert [type(c).__name__ for c in make_prompt_cache(model)] == ["RotatingKVCache",
                                                                    "KVCache"]
    one, _ = serving(tmp_path / "one", sliding_llama, at_once)
    two, health = serving(tmp_path / "two", sliding_llama, at_once, "--shards", "2")
    assert len(set(one)) > 1, one
    assert two == one
    assert max(int(k) for k in health["batch"]["batch_sizes"]) >= 3, health["batch"]
    ops = health["world"]["mirrored_cache_ops"]
    assert {"merge", "extract", "filter"} <= set(ops), ops


def test_a_model_with_other_cache_layers_is_refused_at_start():
    from mlx_lm.models import mamba

    model = mamba.Model(mamba.ModelArgs(
        model_type="mamba", vocab_size=64, hidden_size=16, intermediate_size=32, state_size=4,
        num_hidden_layers=2, conv_kernel=4, use_bias=False, use_conv_bias=True,
        time_step_rank=2))
    with pytest.raises(ShardingError, match=r"\(ArraysCache\) are not mirrored across ranks"
                       r".*serve it in one process"):
        check_caches(model)

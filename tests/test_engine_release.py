"""An engine lets go of its model when its load fails and when it stops: its thread parks for
good (MLX's thread-local teardown must not run at exit), and a parked engine must not keep
the weights alive (issue 30's notes: a failed load kept them, in the error's frames)."""

from __future__ import annotations

import gc
import weakref

import pytest
from tiny_model import make_tiny_model

from mlxc.config import load_settings
from mlxc.errors import ModelError
from mlxc.request import GenerationRequest


def live_models() -> set[int]:
    """The ids of the mlx-lm models alive in this process."""
    from mlx_lm.models.llama import Model

    gc.collect()
    return {id(o) for o in gc.get_objects() if isinstance(o, Model)}


def engine_for(model, cache_dir, **overrides):
    from mlxc.engine.worker import Engine
    from mlxc.model.refs import resolve_model

    settings = load_settings().with_overrides(
        cache_dir=cache_dir, model=str(model), prefix_memory_bytes=0, prefix_disk_bytes=0,
        **overrides)
    return Engine(resolve_model(settings.model, settings), settings).start()


def test_a_failed_load_keeps_no_weights(tmp_path, tiny_model):
    # The draft's vocabulary differs: refused after the model itself was loaded.
    other = make_tiny_model(tmp_path / "other-vocab", seed=1, vocab_size=512)
    before = live_models()
    engine = engine_for(tiny_model, tmp_path / "cache", speculate="draft",
                        draft_model=str(other))
    with pytest.raises(ModelError, match="tokenizers differ"):
        engine.wait_loaded()
    assert live_models() <= before  # neither the model nor the draft is held
    request = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    with pytest.raises(ModelError, match="tokenizers differ"):  # callers still get the error
        engine.submit(request).result()
    engine.shutdown(wait=30)
    assert live_models() <= before


def test_a_stopped_engine_keeps_no_weights(tmp_path, tiny_model):
    engine = engine_for(tiny_model, tmp_path / "cache")
    engine.wait_loaded()
    request = GenerationRequest(messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    assert engine.submit(request).result().text is not None
    model = weakref.ref(engine.model)
    engine.shutdown(wait=30)
    gc.collect()
    assert model() is None
    assert engine.figures()["running"] == 0  # its figures still read, from nothing

"""The suite's own memory: engines a test closes must not pile up in the test process (each
SmolLM2 engine kept its ~0.5 GB model; the process reached 6.4 GB)."""

from __future__ import annotations

import weakref

from conftest import let_go_of_stopped_engines

from mlxc.config import Settings
from mlxc.request import GenerationRequest
from mlxc.service import Service


def test_a_closed_engine_lets_go_of_its_model(tiny_model, tmp_path):
    settings = Settings(model=str(tiny_model), cache_dir=tmp_path, models_dir=tmp_path / "models",
                        cache_policy="off")
    svc = Service(settings)
    try:
        svc.start(GenerationRequest(prompt="Hello there", max_tokens=3)).result()
        engine = svc.engine()
        model, batch_model = weakref.ref(engine.model), weakref.ref(engine.batch_model)
    finally:
        svc.close()
    let_go_of_stopped_engines()  # as after every test; a stopped engine's thread stays parked
    assert model() is None and batch_model() is None

"""Model names resolve without MLX, and the fingerprint covers files and dtype."""

from __future__ import annotations

import json

import pytest

from mlxc.config import Settings
from mlxc.model.refs import ModelError, model_fingerprint, resolve_model


def test_fingerprint_depends_on_the_dtype_and_the_files(tiny_model, tmp_path):
    settings = Settings(models_dir=tmp_path / "models")
    ref = resolve_model(str(tiny_model), settings)
    keep = model_fingerprint(ref, Settings(models_dir=settings.models_dir, dtype="keep"))
    half = model_fingerprint(ref, Settings(models_dir=settings.models_dir, dtype="float16"))
    assert keep != half  # an answer is never served for a set-up that did not produce it
    assert keep == model_fingerprint(ref, Settings(models_dir=settings.models_dir, dtype="keep"))

    copy = tmp_path / "copy"
    copy.mkdir()
    for f in tiny_model.iterdir():
        if f.is_file() and not f.name.startswith("."):
            (copy / f.name).write_bytes(f.read_bytes())
    same = resolve_model(str(copy), settings)
    assert model_fingerprint(same, Settings(models_dir=settings.models_dir, dtype="keep")) == keep
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-6}))
    changed = model_fingerprint(same, Settings(models_dir=settings.models_dir, dtype="keep"))
    assert changed != keep


def test_names_that_are_not_models_are_clear_errors(tmp_path):
    settings = Settings(models_dir=tmp_path)
    with pytest.raises(ModelError, match="not found"):
        resolve_model(str(tmp_path / "missing.gguf"), settings)
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model(str(tmp_path), settings)
    with pytest.raises(ModelError, match="not a folder"):
        resolve_model("no such thing", settings)
    assert resolve_model("org/name", settings).source == "hub"

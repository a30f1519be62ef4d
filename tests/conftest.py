from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_model import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture
def mlxc_env(tmp_path, tiny_model) -> dict[str, str]:
    """Environment for running `mlxc` in a subprocess on the tiny model, own cache folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXC_")}
    env.update(
        MLXC_MODEL=str(tiny_model),
        MLXC_CACHE_DIR=str(tmp_path / "cache"),
        MLXC_MODELS_DIR=str(tmp_path / "models"),
    )
    return env


def run_mlxc(*args: str, env: dict[str, str], input: str | None = None, timeout: float = 300):
    """Run the real command line in a new process, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "mlxc", *args],
        env=env,
        input=input if input is not None else "",
        capture_output=True,
        text=True,
        timeout=timeout,
    )

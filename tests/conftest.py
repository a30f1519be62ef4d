from __future__ import annotations

import ast
import json
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


HEAVY = ("mlx", "mlx.core", "mlx_lm", "transformers")


def run_mlxc_light(*args: str, env: dict[str, str]) -> tuple[dict, list[str]]:
    """Run the CLI in a new process; return its JSON output and the heavy modules it imported
    (the cache-hit path and `cache stats` must import none of them)."""
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['mlxc', *{list(args)!r}]\n"
        "try:\n    runpy.run_module('mlxc', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print('HEAVY', [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, input=""
    )
    heavy_line = [line for line in result.stderr.splitlines() if line.startswith("HEAVY")]
    assert heavy_line, result.stderr
    return json.loads(result.stdout), ast.literal_eval(heavy_line[-1].removeprefix("HEAVY "))

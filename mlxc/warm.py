"""`mlxc cache warm`: fill the response cache from a JSONL file of requests, before a demo.

Each line is one request as `mlxc ask` and the server take it: {"prompt": ...} (with an
optional "system") or {"messages": [...]}, plus any sampling field (max_tokens, temperature,
seed, …) and "model". It becomes the same GenerationRequest as `mlxc ask` or a chat completion
with those values would, hence the same cache key: a warmed line is a hit for both.

Lines already cached are skipped (so a warm-up resumes where it stopped), bad lines are
reported with their number and skipped, and Ctrl-C keeps every answer finished so far.
Here: reading lines and the run; where they go (this process or a server): warm_targets.py.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pydantic import ValidationError

from mlxc.conversation import build_messages
from mlxc.errors import InputError, ModelError, describe
from mlxc.request import GenerationRequest

# Fields an OpenAI request log carries that change nothing in the answer.
IGNORED = frozenset({"id", "user", "stream", "stream_options", "metadata", "n"})
EXAMPLE = '{"prompt": "What is MLX?", "max_tokens": 128}'


@dataclass
class Line:
    """One line of the file: a request, or the reason it is not one."""

    number: int
    request: GenerationRequest | None = None
    model: str | None = None
    error: str | None = None


def read_lines(source: str) -> list[tuple[int, str]]:
    """The non-blank lines with their 1-based numbers; '-' reads stdin."""
    name = "stdin" if source == "-" else source
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{name}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{name} is a folder, not a JSONL file") from None
    except UnicodeDecodeError:
        raise InputError(f"{name} is not UTF-8 text") from None
    except OSError as exc:
        raise InputError(f"cannot read {name}: {exc.strerror or exc}") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise InputError(f"{name} is empty: give one JSON request per line, e.g. {EXAMPLE}")
    return lines


def parse_line(number: int, text: str) -> Line:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Line(number, error=f"not JSON ({exc.msg} at column {exc.colno})")
    if not isinstance(obj, dict):
        return Line(number, error=f"not a JSON object, e.g. {EXAMPLE}")
    try:
        request, model = request_from(obj)
    except (ValueError, ValidationError) as exc:
        return Line(number, error=describe(exc))
    return Line(number, request, model)


def load(source: str) -> list[Line]:
    return [parse_line(number, text) for number, text in read_lines(source)]


def request_from(obj: dict[str, Any]) -> tuple[GenerationRequest, str | None]:
    """A line's fields -> (the request `mlxc ask` would build, the model it names)."""
    fields = {k: v for k, v in obj.items() if k not in IGNORED}
    model, system = fields.pop("model", None), fields.pop("system", None)
    for name, value in (("model", model), ("system", system)):
        if value is not None and not isinstance(value, str):
            raise ValueError(f"{name}: must be a string")
    if "max_completion_tokens" in fields:  # OpenAI's newer name
        fields.setdefault("max_tokens", fields.pop("max_completion_tokens"))
    if "prompt" in fields and "messages" in fields:
        raise ValueError("give either prompt or messages, not both")
    if "prompt" in fields:
        prompt = fields.pop("prompt")
        if not isinstance(prompt, str):
            raise ValueError("prompt: must be a string")
        fields["messages"] = build_messages(prompt, system, None)
    elif "messages" in fields:
        messages = fields["messages"]
        if system and isinstance(messages, list):
            if messages and isinstance(messages[0], dict) and messages[0].get("role") == "system":
                raise ValueError("give the system prompt once: as system or as the first message")
            fields["messages"] = [{"role": "system", "content": system}, *messages]
    else:
        raise ValueError(f'no "prompt" or "messages": e.g. {EXAMPLE}')
    return GenerationRequest(**fields), model


# -- running -------------------------------------------------------------------------------


class Target(Protocol):
    """Where lines are warmed: this process (LocalTarget) or a server (RemoteTarget)."""

    def key(self, line: Line) -> str: ...
    def is_cached(self, line: Line) -> bool: ...
    def run(self, line: Line, on_text: Callable[[str], None]) -> tuple[str, int]: ...
    def close(self) -> None: ...


class Listener(Protocol):
    """What a display is told; called from the main thread only."""

    def planned(self, lines: int, cached: int, to_run: int) -> None: ...
    def failed(self, number: int, reason: str) -> None: ...
    def text(self, piece: str) -> None: ...
    def done(self, status: str, tokens: int, seconds: float) -> None: ...


@dataclass
class Summary:
    lines: int = 0
    warmed: int = 0
    cached: int = 0
    failed: int = 0
    tokens: int = 0
    seconds: float = 0.0
    generating_seconds: float = 0.0  # without reading, model loading and skipped lines
    interrupted: bool = False
    failures: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        busy = self.generating_seconds
        return self.tokens / busy if busy > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        keys = ("lines", "warmed", "cached", "failed", "tokens", "interrupted", "failures")
        return {k: getattr(self, k) for k in keys} | {
            "seconds": round(self.seconds, 3),
            "generating_seconds": round(self.generating_seconds, 3),
            "tokens_per_second": round(self.tokens_per_second, 1),
        }


def warm(lines: list[Line], target: Target, listener: Listener, strict: bool = False) -> Summary:
    """Warm every good line not cached yet, in file order. Stops early on Ctrl-C (what
    finished stays cached) and, with `strict`, at the first failure."""
    summary = Summary(lines=len(lines))
    started = time.perf_counter()

    def fail(number: int, reason: str) -> None:
        summary.failed += 1
        summary.failures.append({"line": number, "error": reason})
        listener.failed(number, reason)

    todo, seen = [], set()
    try:
        for line in lines:
            if line.error is None:
                try:
                    key = target.key(line)
                    cached = key in seen or target.is_cached(line)
                except (ModelError, InputError) as exc:  # the line's own fault...
                    if isinstance(exc, ModelError) and line.model is None:
                        raise  # ...unless it is the model every line uses
                    line.error = describe(exc)
            if line.error is not None:
                fail(line.number, line.error)
                if strict:
                    return summary
                continue
            summary.cached += cached
            if not cached:
                seen.add(key)
                todo.append(line)
        listener.planned(len(lines), summary.cached, len(todo))
        for line in todo:
            line_started = time.perf_counter()
            try:
                status, tokens = target.run(line, listener.text)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                fail(line.number, describe(exc))
                if strict:
                    break
                continue
            seconds = time.perf_counter() - line_started
            if status == "hit":  # a server answered from its cache: nothing was generated
                summary.cached += 1
            else:
                summary.warmed += 1
                summary.tokens += tokens
                summary.generating_seconds += seconds
            listener.done(status, tokens, seconds)
            if getattr(target, "interrupted", False):
                raise KeyboardInterrupt
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        summary.seconds = time.perf_counter() - started
    return summary

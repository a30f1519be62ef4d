"""mlx_lm.server's own draft-model mode (`--draft-model`, its speculative_generate_step; it
turns batching off), beside mlxc's in benchmarks/speculative.py --draft-model: the same
requests, single stream, greedy, with and without the draft model, on the same folders.

Decode tokens/s of a request, counted as mlxc's `Answer.tokens_per_second`: its completion
tokens (usage, `stream_options.include_usage`) over the time from the first content piece to
the end of the stream.
Both get the same weights in float32 (mlxc's CPU default; mlx_lm.server is handed float32
copies of the model and the draft, saved once) and the same OpenBLAS, loaded before MLX, as
benchmarks/concurrency_servers.py starts it (as shipped, 4-bit, mlx_lm.server decoded ~1 tok/s
with the draft on this CPU).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from concurrency_servers import LAUNCH_MLX_LM, _env
from mlx_lm_peer import mlx_lm_server


def server(folder: str, draft: str | None, num_draft: int):
    """mlx_lm.server started as concurrency_servers.py starts it (OpenBLAS loaded first)."""
    extra = ["--draft-model", draft, "--num-draft-tokens", str(num_draft)] if draft else []
    return mlx_lm_server(folder, *extra, launch=["-c", LAUNCH_MLX_LM], env=_env())


def decode_rate(url: str, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """(decode tokens/s, text) of one streamed greedy request."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    parts: list[str] = []
    first = None
    tokens = 0
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if usage := chunk.get("usage"):
                tokens = usage.get("completion_tokens", tokens)
            for choice in chunk.get("choices", []):
                if text := (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    parts.append(text)
    end = time.perf_counter()
    return tokens / max(end - (first or end), 1e-9), "".join(parts)


def in_child(code: str, *args: str) -> None:
    """Run `code` (benchmarks/ and tests/ importable, `Path` and `args` defined) in a child
    process: MLX used on this process's main thread before its engines start halved their
    decode (SmolLM2-135M, 2-core CPU, 8 Dec: 13-14 -> 6.3-7.8 tok/s)."""
    here = Path(__file__).resolve().parent
    prelude = ("import sys; from pathlib import Path; sys.path[:0] = sys.argv[1:3]; "
               "args = sys.argv[3:]; ")
    subprocess.run([sys.executable, "-c", prelude + code, str(here), str(here.parent / "tests"),
                    *args], check=True)


@dataclass
class PeerAnswer:
    """What speculative.run reads of an answer: its text, decode rate and speculation usage
    (mlx_lm.server reports none)."""

    text: str
    tokens_per_second: float
    usage: Any = field(default_factory=lambda: SimpleNamespace(accepted_tokens=None,
                                                               drafted_tokens=None))


class PeerEngine:
    """A running mlx_lm.server as speculative.run drives an engine (`submit(r).result()`), so
    the peer is taken in turns with mlxc's modes, request by request, on one machine's load."""

    def __init__(self, url: str) -> None:
        self.url = url

    def submit(self, request: Any) -> Future:
        messages = [m.model_dump(exclude_none=True) for m in request.messages]
        rate, text = decode_rate(self.url, messages, request.max_tokens)
        done: Future = Future()
        done.set_result(PeerAnswer(text, rate))
        return done

    def figures(self) -> dict:
        return {}

    def shutdown(self, wait: float = 0) -> None:
        """The server stops with `peer_engines`' context."""


@contextmanager
def peer_engines(folder: str, draft: str, num_draft: int) -> Iterator[dict[str, PeerEngine]]:
    """mlx_lm.server plain and with `draft`, both running (float32 copies, warmed), by name."""
    f32 = {path: str(Path(tempfile.gettempdir()) / f"mlxc-f32-{Path(path).name}-"
                     f"{hashlib.sha256(path.encode()).hexdigest()[:8]}")  # reused run to run
           for path in (folder, draft)}
    for path, copy in f32.items():
        in_child("from concurrency_servers import float32_copy; "
                 "float32_copy(Path(args[0]), Path(args[1]))", path, copy)
    with ExitStack() as stack:
        engines = {}
        for name, with_draft in (("plain", None), ("draft", f32[draft])):
            url = stack.enter_context(server(f32[folder], with_draft, num_draft))
            decode_rate(url, [{"role": "user", "content": "Say hello."}], 4)  # warm
            engines[f"mlx_lm.server {name}"] = PeerEngine(url)
        yield engines

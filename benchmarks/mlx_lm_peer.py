"""The same follow-up conversation, timed on mlx-lm's own server (`mlx_lm server`), so
prefix_follow_up.py can report a peer's ratios measured in the same run on the same shape.

mlx_lm.server keeps prompt states in memory only, so there are two cases: cold (a fresh
server) and memory (the server that answered turn 1). It loads the model as shipped (no
dtype change), so compare it with mlxc at `--dtype keep`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
from shared import free_port


@contextmanager
def mlx_lm_server(folder: str, *args: str, launch: list[str] | None = None,
                  env: dict[str, str] | None = None) -> Iterator[str]:
    """A running `mlx_lm server` on 127.0.0.1 (started by `launch`, default `-m mlx_lm
    server`, with `args` after its own), yields its base URL, stops it on exit."""
    port = free_port()
    launch = launch or ["-m", "mlx_lm", "server"]
    proc = subprocess.Popen(
        [sys.executable, *launch, "--model", folder, "--port", str(port),
         "--log-level", "WARNING", *args],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                httpx.get(f"{url}/v1/models", timeout=2).raise_for_status()
                break
            except httpx.HTTPError as exc:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"mlx_lm server did not start ({exc})") from None
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def timed_chat(url: str, messages: list[dict], max_tokens: int) -> tuple[float, str]:
    """(seconds to the first content token, the whole answer) of one streamed request."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    parts: list[str] = []
    first = None
    started = time.perf_counter()
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=3600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            for choice in json.loads(line[6:]).get("choices", []):
                if text := (choice.get("delta") or {}).get("content"):
                    first = first or time.perf_counter()
                    parts.append(text)
    return (first or time.perf_counter()) - started, "".join(parts)


def follow_up_ttft(
    folder: str, reps: int, answer_tokens: int,
    turn1: Callable[[int], list[dict]], turn2: Callable[[int, str], list[dict]],
) -> dict:
    """Turn 2's TTFT on mlx_lm.server: from memory after turn 1, and cold on a fresh server."""
    warm_up = [{"role": "user", "content": "Say hello."}]
    out: dict = {"memory": [], "cold": [], "texts": {"memory": [], "cold": []}}
    answers = []
    with mlx_lm_server(folder) as url:
        timed_chat(url, warm_up, 4)
        for i in range(reps):
            _, answer = timed_chat(url, turn1(i), answer_tokens)
            answers.append(answer)
            seconds, text = timed_chat(url, turn2(i, answer), 8)
            out["memory"].append(seconds)
            out["texts"]["memory"].append(text)
    for i in range(reps):  # a fresh server per conversation: nothing of turn 1 is cached
        with mlx_lm_server(folder) as url:
            timed_chat(url, warm_up, 4)
            seconds, text = timed_chat(url, turn2(i, answers[i]), 8)
            out["cold"].append(seconds)
            out["texts"]["cold"].append(text)
    return out

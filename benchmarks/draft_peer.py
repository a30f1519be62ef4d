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

import json
import sys
import tempfile
import time
from pathlib import Path

import httpx
from concurrency_servers import LAUNCH_MLX_LM, _env, float32_copy
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


def peer_rates(folder: str, draft: str, requests: list[list[dict]], max_tokens: int,
               rounds: int, num_draft: int) -> dict[str, list[tuple[float, str]]]:
    """plain and draft: per request, (median decode tokens/s over `rounds`, last text)."""
    import statistics

    out: dict[str, list[tuple[float, str]]] = {}
    f32 = {path: str(float32_copy(Path(path), Path(tempfile.gettempdir()) /
                                  f"mlxc-f32-{Path(path).name}-{abs(hash(path)) % 10**8}"))
           for path in (folder, draft)}
    folder, draft = f32[folder], f32[draft]
    for name, with_draft in (("plain", None), ("draft", draft)):
        with server(folder, with_draft, num_draft) as url:
            decode_rate(url, [{"role": "user", "content": "Say hello."}], 4)  # warm
            rows = []
            for messages in requests:
                runs = [decode_rate(url, messages, max_tokens) for _ in range(rounds)]
                rows.append((statistics.median(r for r, _ in runs), runs[-1][1]))
                print(f"mlx_lm.server {name}: {rows[-1][0]:.1f} tok/s", file=sys.stderr,
                      flush=True)
            out[name] = rows
    return out

"""What the benchmarks share (imported by the suites here and by diagnostics/):
- an engine warmed up without caches, requests to it, and their timings (concurrency.py and
  the burst diagnostics);
- a real `mlxc serve` on a free port, and percentiles of its latencies;
- for the decode-step diagnostics: a model loaded as they measure it, and caches filled to a
  context, left-padded as mlx-lm's batch holds them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from mlxc.config import load_settings
from mlxc.engine.worker import Engine
from mlxc.model.refs import resolve_model
from mlxc.request import GenerationRequest
from mlxc.stream import Delta

TOPICS = ["a lighthouse keeper", "a city under the sea", "the first computer", "a red fox",
          "a mountain village", "the moon landing", "a jazz musician", "an old library",
          "a desert caravan", "a robot gardener"]


def prompt(i: int, words: int = 0) -> GenerationRequest:
    text = f"Request {i}: write a long story about {TOPICS[i % len(TOPICS)]}."
    if words:
        text += " Context: " + " ".join(f"word{k % 97}" for k in range(words))
    return GenerationRequest(messages=[{"role": "user", "content": text}])


def warm_engine(model: str | None, max_batch: int = 8, max_queue: int = 64) -> Engine:
    """An engine on `model` without prefix caches (every prompt is prefilled), warmed up."""
    settings = load_settings().with_overrides(
        cache_dir=Path(tempfile.mkdtemp(prefix="mlxc-bench-")), model=model,
        prefix_memory_bytes=0, prefix_disk_bytes=0)
    engine = Engine(resolve_model(settings.model, settings), settings, max_batch=max_batch,
                    max_queue=max_queue).start()
    engine.wait_loaded()
    engine.call(lambda e: e.warm_up()).result()
    return engine


def timed(engine: Engine, request: GenerationRequest) -> dict:
    """One request: TTFT, end-to-end seconds, tokens, its delta times and its text."""
    started = time.perf_counter()
    times, answer = [], None
    generation = engine.submit(request)
    for event in generation.events():
        if isinstance(event, Delta):
            times.append(time.perf_counter())
    answer = generation.result()
    end = time.perf_counter()
    return {"ttft": (times[0] if times else end) - started, "e2e": end - started,
            "tokens": answer.usage.completion_tokens, "times": times, "text": answer.text}


def together(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, list[dict]]:
    """Send all at once (one thread each); (wall seconds, per-request figures)."""
    out: list[dict | None] = [None] * len(requests)

    def run(i: int) -> None:
        out[i] = timed(engine, requests[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(requests))]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - started, out  # type: ignore[return-value]


def raw_decode_tps(engine: Engine, request: GenerationRequest, n: int) -> float:
    import mlx.core as mx
    from mlx_lm import stream_generate

    *_, last = stream_generate(engine.model, engine.tokenizer, mx.array(engine.encode(request)),
                               max_tokens=n, prefill_step_size=engine.prefill_step_size)
    return last.generation_tps


def gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def mlx_lm_text(engine: Engine, request: GenerationRequest) -> str:
    import mlx.core as mx
    from mlx_lm import stream_generate

    return "".join(r.text for r in stream_generate(
        engine.model, engine.tokenizer, mx.array(engine.encode(request)),
        max_tokens=request.max_tokens, prefill_step_size=engine.prefill_step_size,
    ))


def decode_tps(figures: dict) -> float:
    times = figures["times"]
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 2 else 0.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




def load_model(path: str, dequantize: bool = True) -> Any:
    """mlx-lm's model at `path`, its quantized layers dequantized to their scales' dtype
    (what mlxc's `--dtype auto` gives on CUDA)."""
    import mlx.core as mx
    from mlx_lm import load

    model, _ = load(path)
    if dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        mx.eval(model.parameters())
    return model


def row_lengths(context: int, rows: int) -> list[int]:
    """Lengths around `context`, uneven as a batch's are, so rows are padded."""
    return [context - 17 * (i % 5) for i in range(rows)]


def lone_caches(model: Any) -> Any:
    """A cache maker (left paddings -> per-layer caches) of plain `KVCache`s."""
    from mlx_lm.models.cache import KVCache

    return lambda pads: [KVCache() for _ in model.layers]


def batch_caches(model: Any) -> Any:
    """A cache maker of mlx-lm's left-padded `BatchKVCache`s."""
    from mlx_lm.models.cache import BatchKVCache

    return lambda pads: [BatchKVCache(pads) for _ in model.layers]


def filled(model: Any, cache_of: Any, lengths: list[int]) -> list:
    """Caches from `cache_of` for len(lengths) sequences, row r holding lengths[r] tokens
    (left padded), evaluated."""
    import mlx.core as mx

    longest = max(lengths)
    caches = cache_of([longest - n for n in lengths])
    model(mx.array([[7] * longest for _ in lengths]), cache=caches)
    mx.eval([c.state for c in caches])
    return caches


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def start_server(model: str | None, cache_dir: Path, log_path: Path, startup_timeout: float,
                 extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """A real `mlxc serve` on a free port with its own cache folder, once its model is loaded."""
    port = free_port()
    cmd = [sys.executable, "-m", "mlxc", "serve", "--port", str(port), "--cache-dir",
           str(cache_dir), *extra]
    if model:
        cmd += ["--model", model]
    env = {k: v for k, v in os.environ.items() if k != "MLXC_API_KEY"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log_path.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).json().get("model_loaded"):
                return proc, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            raise SystemExit(f"the server did not start in time:\n{log_path.read_text()}")
        time.sleep(0.25)

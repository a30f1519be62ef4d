"""mlxc's engine against raw `mlx_lm.stream_generate` on the same loaded model.

    python benchmarks/engine_overhead.py [--model PATH] [--tokens 64] [--rounds 3] [--json]

Both paths run on the engine's own thread, greedy, the same prompt, alternating rounds so
load on the machine hits both alike. Reports decode tokens/s of each, their ratio (target
>= 0.97), and the cost per token of mlxc's own code between tokens (stop matching, tool-call
filter, the hand-off to a subscriber), measured apart without the model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from mlxc.config import load_settings
from mlxc.engine.decode.stops import StopMatcher
from mlxc.engine.decode.tools import ToolCallFilter
from mlxc.engine.worker import Engine
from mlxc.model.refs import resolve_model
from mlxc.request import Answer, GenerationRequest
from mlxc.stream import Delta, Finished, Generation

PROMPT = "Write a long story about a lighthouse keeper and the sea."


def raw_decode_tps(engine: Engine, request: GenerationRequest, n: int) -> float:
    import mlx.core as mx
    from mlx_lm import stream_generate

    tokens = engine.encode(request)
    *_, last = stream_generate(
        engine.model, engine.tokenizer, mx.array(tokens), max_tokens=n,
        prefill_step_size=engine.prefill_step_size,
    )
    return last.generation_tps


def per_token_overhead_us(pieces: int = 20000) -> float:
    """mlxc's work between two tokens, without the model: the stop/tool-call filter, the
    publish, and a subscriber thread receiving each piece (as the CLI or server does)."""
    import threading

    generation = Generation()
    received = []
    consumer = threading.Thread(target=lambda: received.extend(generation.events()))
    consumer.start()
    while generation._subscribers == 0:  # the subscriber is attached before we publish
        time.sleep(0.001)
    matcher = ToolCallFilter(StopMatcher(["</stop>"]))
    start = time.perf_counter()
    for i in range(pieces):
        emit, _ = matcher.feed(" word" if i % 7 else " the")
        generation.publish(Delta(emit))
    generation.publish(Finished(Answer(text="")))
    consumer.join()
    return (time.perf_counter() - start) / pieces * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: mlxc's default)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    settings = load_settings().with_overrides(
        cache_dir=Path(tempfile.mkdtemp(prefix="mlxc-overhead-")), model=args.model,
        prefix_memory_bytes=0, prefix_disk_bytes=0,  # decode only: no prefix reuse
    )
    engine = Engine(resolve_model(settings.model, settings), settings).start()
    engine.wait_loaded()
    request = GenerationRequest(
        messages=[{"role": "user", "content": PROMPT}], max_tokens=args.tokens
    )
    raw, ours = [], []
    engine.call(lambda e: raw_decode_tps(e, request, 8)).result()  # warm-up
    for _ in range(args.rounds):
        raw.append(engine.call(lambda e: raw_decode_tps(e, request, args.tokens)).result())
        ours.append(engine.submit(request).result().tokens_per_second)
    engine.shutdown(wait=30)
    overhead = per_token_overhead_us()
    figures = {
        "model": settings.model,
        "dtype": engine.dtype,
        "tokens": args.tokens,
        "raw_decode_tps": round(statistics.median(raw), 2),
        "mlxc_decode_tps": round(statistics.median(ours), 2),
        "ratio": round(statistics.median(ours) / statistics.median(raw), 3),
        "mlxc_code_per_token_us": round(overhead, 1),
        "share_of_token_time": round(overhead * 1e-6 * statistics.median(ours), 5),
    }
    if args.json:
        print(json.dumps(figures))
        return
    for name, value in figures.items():
        print(f"{name:24} {value}")


if __name__ == "__main__":
    main()

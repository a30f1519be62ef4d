"""Logprobs on a real model, checked against first principles:
- each greedy token's logprob equals the top logprob of its step (and is the top token);
- the sum of the echoed prompt logprobs (completions `echo`, `max_tokens: 0`) equals a direct
  computation with mlx-lm: one forward pass and log-softmax, on `mlx_lm.load` of the same
  folder (as shipped) and on the engine's own loaded weights.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/diagnostics/logprobs_check.py [--model PATH]
        [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path

from mlxc.config import load_settings
from mlxc.engine.worker import Engine
from mlxc.model.refs import resolve_model
from mlxc.request import GenerationRequest

TEXT = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital and largest city of "
    "France. It is known for the Eiffel Tower, which was built for the 1889 World's Fair."
)


def direct_sum(model, tokens: list[int]) -> float:
    import mlx.core as mx

    logits = model(mx.array(tokens)[None])[0].astype(mx.float32)
    rows = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = mx.take_along_axis(rows[:-1], mx.array(tokens[1:])[:, None], axis=-1)
    return picked.sum().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model (default: mlxc's default)")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    settings = load_settings().with_overrides(
        cache_dir=Path(tempfile.mkdtemp(prefix="mlxc-logprobs-")), model=args.model)
    engine = Engine(resolve_model(settings.model, settings), settings).start()
    engine.wait_loaded()

    chat = engine.submit(GenerationRequest(
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=args.tokens, logprobs=True, top_logprobs=5)).result()
    worst = max(abs(e["logprob"] - e["top_logprobs"][0]["logprob"]) for e in chat.logprobs)
    top_ids = all(e["id"] == e["top_logprobs"][0]["id"] for e in chat.logprobs)

    echo = engine.submit(GenerationRequest(
        prompt=TEXT, max_tokens=0, echo=True, logprobs=True)).result()
    tokens = [e["id"] for e in echo.prompt_logprobs]
    ours = sum(e["logprob"] for e in echo.prompt_logprobs[1:])
    same_weights = engine.call(lambda e: direct_sum(e.model, tokens)).result()
    engine.shutdown(wait=30)
    from mlx_lm import load

    theirs = direct_sum(load(str(engine.ref.folder))[0], tokens)
    figures = {
        "model": settings.model, "dtype": engine.dtype,
        "greedy_tokens": len(chat.logprobs),
        "greedy_is_top_token": top_ids,
        "max_abs_greedy_minus_top_logprob": worst,
        "prompt_tokens": len(tokens),
        "echo_sum_logprob": round(ours, 5),
        "mlx_lm_direct_sum_logprob": round(theirs, 5),
        "relative_difference": abs(ours - theirs) / abs(theirs),
        # the engine runs the weights dequantized to float32 on a CPU (model/dtype.py); on
        # those same weights the direct computation agrees to float32 rounding:
        "direct_sum_on_engine_weights": round(same_weights, 5),
        "relative_difference_same_weights": abs(ours - same_weights) / abs(same_weights),
        "nats_per_token": round(-ours / (len(tokens) - 1), 4),
        "within_1e-3": math.isclose(ours, theirs, rel_tol=1e-3),
    }
    print(json.dumps(figures, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

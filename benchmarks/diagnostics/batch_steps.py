"""Where a batched decode step's time goes, on mlx-lm alone (no mlxc code in the loop).

    python benchmarks/diagnostics/batch_steps.py --model PATH [--sizes 1,2,4,8,16] [--tokens 64]
                                     [--dequantize keep|bfloat16]

- raw: `mlx_lm.stream_generate` decode tokens/s (one sequence, KVCache);
- batch B: mlx-lm's `BatchGenerator` with B prompts, decode steps/s and tokens/s;
- matmul M: one quantized (or plain) projection of the model with M rows, ms per call,
  to tell the model's own batched cost from the generator's bookkeeping.
With --dequantize the quantized layers are turned into plain ones first (in their scales'
dtype, or bfloat16): what batched decoding would cost with plain weights.
"""

from __future__ import annotations

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--sizes", default="1,2,4,8,16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--dequantize", choices=["keep", "bfloat16"])
    args = parser.parse_args()
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import BatchGenerator

    model, tokenizer = load(args.model)
    if args.dequantize:
        from mlx_lm.utils import dequantize_model

        model = dequantize_model(model)
        if args.dequantize == "bfloat16":
            model.set_dtype(mx.bfloat16)
        mx.eval(model.parameters())
        out_note = {"dequantized": args.dequantize}
    else:
        out_note = {}
    prompt = tokenizer.encode("Write a long story about the sea and a lighthouse keeper.")
    out: dict = dict(out_note)
    for _ in range(2):  # the first run compiles
        *_, last = stream_generate(model, tokenizer, mx.array(prompt), max_tokens=args.tokens)
    out["raw_tokens_per_second"] = round(last.generation_tps, 1)
    for size in [int(s) for s in args.sizes.split(",")]:
        for _ in range(2):
            gen = BatchGenerator(model, max_tokens=args.tokens, completion_batch_size=size,
                                 prefill_batch_size=size)
            gen.insert([prompt[: len(prompt) - i % 3] for i in range(size)])
            steps, started = 0, None
            while responses := gen.next_generated():
                steps += 1
                if steps == 2:
                    started = time.perf_counter()
            seconds = time.perf_counter() - started
            gen.close()
        out[f"batch_{size}"] = {"steps_per_second": round((steps - 2) / seconds, 1),
                                "tokens_per_second": round(size * (steps - 2) / seconds, 1)}
        del responses
    layer = model.model.layers[0].mlp.gate_proj
    width = layer.weight.shape[1] * (32 // getattr(layer, "bits", 32))
    for m in [int(s) for s in args.sizes.split(",")]:
        x = mx.random.normal((m, 1, width)).astype(mx.bfloat16)
        mx.eval(layer(x))
        started = time.perf_counter()
        for _ in range(50):
            y = layer(x)
            mx.eval(y)
        out[f"matmul_{m}_ms"] = round((time.perf_counter() - started) / 50 * 1000, 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()

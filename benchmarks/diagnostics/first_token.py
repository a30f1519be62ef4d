"""Time to the first (and second) token: mlxc's token loop against mlx-lm's `stream_generate`,
on the same model and the same cached state, for a follow-up that adds N tokens.

Both runs start from a KV state holding the first `--cached` prompt tokens (trimmed back after
each run) and feed the rest; they alternate, so machine noise hits both alike. Also checks
that both give the same greedy tokens.

    python benchmarks/diagnostics/first_token.py                 # 44 new tokens and an exact
        repeat (1)
    python benchmarks/diagnostics/first_token.py --new 1 44 200 --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="an MLX model folder (default: mlxc's default model)")
    parser.add_argument("--dtype", default="auto", help="as `mlxc --dtype` (default auto)")
    parser.add_argument("--cached", type=int, default=531, help="prompt tokens already cached")
    parser.add_argument("--new", type=int, nargs="+", default=[44, 1], help="tokens to feed")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from mlxc.config import load_settings
    from mlxc.model.blas import load_optimised_blas
    from mlxc.model.refs import prepare_model, resolve_model

    load_optimised_blas()
    settings = load_settings().with_overrides(model=args.model, dtype=args.dtype)
    ref = resolve_model(settings.model, settings)
    prepare_model(ref)

    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
    from mlx_lm.sample_utils import make_sampler

    from mlxc.engine.decode.generate import generate_tokens, supports_last_position_logits
    from mlxc.model.dtype import apply_dtype, effective_dtype_without_mlx

    model, tokenizer = load(str(ref.folder))
    dtype = effective_dtype_without_mlx(settings.dtype, ref.folder)
    apply_dtype(model, dtype)
    last_only = supports_last_position_logits(model)
    greedy = make_sampler(0.0)
    results = {"model": ref.name, "dtype": dtype, "cached": args.cached, "cases": []}
    for new in args.new:
        prompt = [(i * 7919) % 40000 + 100 for i in range(args.cached + new)]
        state = make_prompt_cache(model)
        model(mx.array(prompt[: args.cached])[None], cache=state)
        mx.eval([c.state for c in state])

        def mlxc_run(prompt=prompt, state=state):
            return generate_tokens(
                model, tokenizer, prompt, args.cached, state, sampler=greedy,
                logits_processors=[], max_tokens=8, prefill_step_size=512, last_only=last_only,
            )

        def mlx_lm_run(prompt=prompt, state=state):
            return stream_generate(
                model, tokenizer, mx.array(prompt[args.cached :]), max_tokens=8,
                sampler=greedy, prompt_cache=state, prefill_step_size=512,
            )

        times = {"mlxc": [], "mlx_lm": []}
        tokens = {}
        for _ in range(args.rounds):
            for name, run in (("mlxc", mlxc_run), ("mlx_lm", mlx_lm_run)):
                trim_prompt_cache(state, state[0].offset - args.cached)
                started, marks, got = time.perf_counter(), [], []
                for step in run():
                    marks.append(time.perf_counter() - started)
                    got.append(step.token)
                    if len(marks) == 2:
                        break
                times[name].append(marks)
                tokens[name] = got
        case = {"new_tokens": new, "same_tokens": tokens["mlxc"] == tokens["mlx_lm"]}
        for name, runs in times.items():
            case[f"{name}_first_ms"] = round(statistics.median(r[0] for r in runs) * 1000, 1)
            case[f"{name}_second_ms"] = round(statistics.median(r[1] for r in runs) * 1000, 1)
        case["first_token_ratio"] = round(case["mlxc_first_ms"] / case["mlx_lm_first_ms"], 3)
        results["cases"].append(case)
    if args.json:
        print(json.dumps(results))
        return
    print(f"{results['model']} ({dtype}), {args.cached} tokens cached, median of {args.rounds}")
    for c in results["cases"]:
        print(f"  +{c['new_tokens']:<4} first token: mlxc {c['mlxc_first_ms']:7.1f} ms, "
              f"mlx-lm {c['mlx_lm_first_ms']:7.1f} ms (x{c['first_token_ratio']}); second: "
              f"{c['mlxc_second_ms']:.1f} vs {c['mlx_lm_second_ms']:.1f} ms; "
              f"same tokens: {c['same_tokens']}")


if __name__ == "__main__":
    main()

"""What a model split over 2 ranks costs against one process (issue 28), through `mlxc bench
--url` on the same weights, one server after the other on this machine: a plain `mlxc serve`
and `mlxc serve --shards 2`, both batching up to --max-batch, and (with --max-batch > 1) the
sharded server one sequence at a time as well (`--shards 2 --max-batch 1`, what it could do
before its batch was mirrored); and whether all answer the same greedy text.

    python benchmarks/sharded_serve.py [--parallel pipeline|tensor] [-n 4] [--max-tokens 32]
        [--max-batch 4] [--concurrency 1,4]
    python benchmarks/sharded_serve.py --code-edit [--max-tokens 96]   # speculation

`--code-edit`: speculation on a sharded model instead: code-edit requests (a source file of
this repo given back with a small change, `prediction` set to the file, as
benchmarks/speculative.py asks them), greedy, one at a time then all at once, on one process
and on 2 ranks, each with --speculate off and auto: tokens/s per request (median), aggregate
tokens/s of all at once, drafts accepted, and whether every answer is the same.

The default SmolLM2-135M's 9 query / 3 KV heads do not divide by 2, so:
- pipeline: the default model itself, its layers split (mlxc's pipeline for llama models);
- tensor: a random llama of SmolLM2-135M's size with 8 query / 4 KV heads (speed only).
Prints each server's `mlxc bench` report (miss TTFT, TPOT, end-to-end medians; aggregate
tokens/s of N clients at once per --concurrency level) and a table of the aggregate tokens/s;
the machine is shared, so the runs are side by side but not alone."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
PROMPTS = ["What is the capital of France?", "Name three colours.", "What is 2 plus 3?",
           "Say hello in Spanish."]


def default_model(_: Path) -> Path:
    """SmolLM2-135M itself: split by layers (mlxc's pipeline for llama, distributed/pipeline.py)."""
    from mlxc.config import load_settings
    from mlxc.model.refs import prepare_model, resolve_model

    ref = resolve_model("default", load_settings())
    prepare_model(ref)
    return ref.folder


def smollm_sized_llama(out: Path) -> Path:
    """A random llama of SmolLM2-135M's size whose heads split over 2 (8 query / 4 KV)."""
    import shutil

    import mlx.core as mx
    from mlx_lm.models import llama
    from mlx_lm.utils import save_config, save_model

    from mlxc.config import load_settings
    from mlxc.model.refs import prepare_model, resolve_model

    ref = resolve_model("default", load_settings())
    prepare_model(ref)
    config = json.loads((ref.folder / "config.json").read_text())
    config.pop("quantization", None)
    config.update(num_attention_heads=8, num_key_value_heads=4, head_dim=72)
    out.mkdir(parents=True)
    for f in ref.folder.iterdir():
        if f.name.startswith("tokenizer") or f.name == "chat_template.jinja":
            shutil.copy(f, out / f.name)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    mx.eval(model.parameters())
    save_model(out, model)
    save_config(config, out / "config.json")
    return out


def answers(url: str, max_tokens: int) -> list[str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"{url}/v1", api_key="none", timeout=300, max_retries=0)
    return [client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": p}], max_tokens=max_tokens,
        temperature=0).choices[0].message.content for p in PROMPTS]


def measure(root: Path, model: Path, args: argparse.Namespace, *flags: str) -> dict:
    from live_server import start_server, stop_server

    root.mkdir()
    server = start_server(root, model, "--speculate", "off", "--alias", "*", *flags)
    try:
        said = answers(server.url, args.max_tokens)
        out = root / "bench.json"
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "mlxc", "bench", "--url", server.url, "-n",
             str(args.requests), "--max-tokens", str(args.max_tokens), "-c", args.concurrency,
             "--json", str(out)], capture_output=True, text=True, env=server.env)
        assert done.returncode == 0, done.stdout + done.stderr
        print(done.stdout[-3000:])
        return {"answers": said, "bench": json.loads(out.read_text()),
                "bench_s": time.perf_counter() - started}
    finally:
        stop_server(server, check=False)


def code_edits(root: Path, model: Path, args: argparse.Namespace, *flags: str) -> dict:
    """The code-edit requests on one server: alone (tokens/s each), then all at once."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from live_server import start_server, stop_server
    from speculative import FILES, ROOT

    def body(path: str, change: str) -> dict:
        source = (ROOT / path).read_text()
        text = (f"Here is {path}:\n```python\n{source}```\nGive back the whole file, with "
                f"one change: {change}. Answer with the file only.")
        return {"model": "m", "messages": [{"role": "user", "content": text}],
                "max_tokens": args.max_tokens, "temperature": 0,
                **({"prediction": {"type": "content", "content": source}}
                   if "off" not in flags else {})}  # refused (400) with speculation off

    def ask(url: str, request: dict) -> tuple[str, int, int, float]:
        started = time.perf_counter()
        reply = httpx.post(f"{url}/v1/chat/completions", json=request, timeout=600,
                           headers={"Cache-Control": "no-cache"})
        took = time.perf_counter() - started
        assert reply.status_code == 200, reply.text
        usage = reply.json()["usage"]
        accepted = (usage.get("completion_tokens_details") or {}).get(
            "accepted_prediction_tokens") or 0
        return (reply.json()["choices"][0]["message"]["content"], usage["completion_tokens"],
                accepted, took)

    requests = [body(path, change) for path, change in FILES.items()]
    root.mkdir()
    server = start_server(root, model, "--alias", "*", "--max-batch", str(len(requests)),
                          *flags)
    try:
        alone = [ask(server.url, r) for r in requests]
        started = time.perf_counter()
        with ThreadPoolExecutor(len(requests)) as pool:
            together = list(pool.map(lambda r: ask(server.url, r), requests))
        wall = time.perf_counter() - started
    finally:
        stop_server(server, check=False)
    return {"answers": [a[0] for a in alone], "answers_together": [a[0] for a in together],
            "tok_s_alone": [round(a[1] / a[3], 2) for a in alone],
            "median_tok_s_alone": round(statistics.median(a[1] / a[3] for a in alone), 2),
            "aggregate_tok_s_together": round(sum(a[1] for a in together) / wall, 2),
            "accepted_alone": [a[2] for a in alone], "tokens_alone": [a[1] for a in alone]}


def main_code_edit(args: argparse.Namespace, model: Path, root: Path) -> dict:
    shards = ("--shards", "2", "--parallel", args.parallel)
    runs = {"one process, off": ("--speculate", "off"),
            "one process, auto": ("--speculate", "auto"),
            "2 ranks, off": (*shards, "--speculate", "off"),
            "2 ranks, auto": (*shards, "--speculate", "auto")}
    done = {name: code_edits(root / f"edit{n}", model, args, *flags)
            for n, (name, flags) in enumerate(runs.items())}
    first = done["one process, off"]["answers"]
    same = all(r["answers"] == first and r["answers_together"] == first for r in done.values())
    print(f"greedy answers equal (alone and together, every server): {same}")
    for name, r in done.items():
        print(f"  {name:20} alone {r['median_tok_s_alone']:6.2f} tok/s (median; "
              f"{r['tok_s_alone']}) · together {r['aggregate_tok_s_together']:6.2f} tok/s · "
              f"accepted {r['accepted_alone']} of {r['tokens_alone']}")
    return {"parallel": args.parallel, "model": str(model), "mode": "code-edit",
            "same_answers": same, "runs": done}


def aggregate(bench: dict) -> dict[str, float]:
    """Aggregate tokens/s by clients at once ('concurrent 4' or, for one level, 'concurrent')."""
    return {name.partition(" ")[2] or "*": round(f["tokens_per_second"], 1)
            for name, f in bench["scenarios"].items() if name.startswith("concurrent")}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--parallel", choices=("pipeline", "tensor"), default="pipeline")
    parser.add_argument("-n", "--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--max-batch", type=int, default=4)
    parser.add_argument("--concurrency", default="1,4", help="clients at once: one level or a "
                        "list, as mlxc bench -c takes it")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--code-edit", action="store_true", help="speculation on code edits "
                        "(see above) instead of mlxc bench")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # speculative.py's FILES
    from mlxc.model.blas import load_optimised_blas

    load_optimised_blas()
    root = Path(tempfile.mkdtemp(prefix="sharded-bench-"))
    os.environ.pop("MLXC_CACHE_DIR", None)
    import shutil

    batch = ("--max-batch", str(args.max_batch))
    shards = ("--shards", "2", "--parallel", args.parallel)
    runs = {"one process": batch, "2 ranks": (*shards, *batch)}
    if args.max_batch > 1:
        runs["2 ranks, one at a time"] = (*shards, "--max-batch", "1")
    try:  # the tensor model is ~0.6 GB: never left behind
        model = (default_model if args.parallel == "pipeline" else smollm_sized_llama)(
            root / "model")
        if args.code_edit:
            report = main_code_edit(args, model, root)
            if args.json:
                args.json.write_text(json.dumps(report, indent=1))
            return 0
        done = {name: measure(root / f"run{n}", model, args, *flags)
                for n, (name, flags) in enumerate(runs.items())}
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = next(iter(done.values()))["answers"]
    report = {"parallel": args.parallel, "model": str(model), "max_batch": args.max_batch,
              "runs": done, "same_answers": all(r["answers"] == first for r in done.values()),
              "aggregate_tokens_per_second": {k: aggregate(r["bench"]) for k, r in done.items()}}
    print(f"greedy answers equal: {report['same_answers']}")
    print(f"aggregate tokens/s by clients at once ({args.parallel}, --max-batch "
          f"{args.max_batch}):")
    for name, levels in report["aggregate_tokens_per_second"].items():
        print(f"  {name:24} " + " · ".join(f"{c}: {v}" for c, v in levels.items()))
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

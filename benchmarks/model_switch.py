"""Several models behind one server (issue 26): how long loading the default model from
mlxc's folder takes, where that time goes, and what switching between two loaded models
costs (target: no reload; loading <= 1.5 s on the 2-core CPU).

    python benchmarks/model_switch.py [--model PATH] [--rounds 5] [--json]
    python benchmarks/model_switch.py --load-only --rounds 7 --against /tmp/old-tree
    python benchmarks/model_switch.py --load-only --rounds 7 --imported   # steps' spans

Part 1, in a fresh process per run, importing what `mlxc serve` has imported when its engine
starts (no mlx-lm: the engine imports it as it loads, engine/load.py): `with_imports_s` counts
from the process's first mlxc import (the issue's figure), `engine_load_s` from the engine's
start, mlx-lm's import included. With `--imported`, mlx-lm is imported first, as before:
`engine_load_s` then leaves the import out, and the steps are the spans of mlx-lm's weights
load, its tokenizer load, the dtype conversion, the prefix cache and the memory gate (spans
overlap: the tokenizer loads on a thread).
`--against DIR` times another checkout's load (a git worktree of an older commit) in
turns with this one's, and gives the ratios.
Part 2, in this process: a ModelPool of the default model under two names (two services,
two engines, two copies of the weights; the second name's dtype differs, so its
fingerprint does), one greedy 4-token request each, then alternating requests A, B, A, B
with `Cache-Control`-like bypass of the response cache; reports loads (must stay 1 each) and
the median latency of a request that switched model vs one that did not.
"""

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

STEPS = r"""
import json, sys, time
T = time.perf_counter; t0 = T(); spans = {}
def timed(owner, name, label):  # record when `owner.name` ran (spans may overlap: threads)
    fn = getattr(owner, name)
    def wrapper(*a, **k):
        start = T(); result = fn(*a, **k); spans[label] = (start, T()); return result
    setattr(owner, name, wrapper)
from mlxc.config import load_settings
from mlxc.model.blas import load_optimised_blas
load_optimised_blas()
from mlxc.engine.worker import Engine
from mlxc.model import dtype as dt
from mlxc.model.refs import resolve_model
imported = sys.argv[2] == "imported"
t_mlx = T()
if imported:  # mlx-lm imported first, its steps timed (spans); else as `mlxc serve` runs
    import mlx.core, mlx_lm, mlx_lm.utils; t_mlx = T()
    import mlxc.engine.kv.cache as kv, mlxc.engine.batch.admission as adm
    timed(mlx_lm.utils, "load_model", "weights")
    timed(mlx_lm.utils, "load_tokenizer", "tokenizer")
    timed(kv.PrefixCache, "__init__", "prefix cache")
    gate = adm.MemoryGate.for_model.__func__
    def for_model(cls, *a, **k):
        start = T(); r = gate(cls, *a, **k); spans["memory gate"] = (start, T()); return r
    adm.MemoryGate.for_model = classmethod(for_model)
timed(dt, "apply_dtype", "dtype")
try:
    import mlxc.model.early_dequant as early
    timed(early, "dequantize_files", "dequantize beside the import")
except ImportError:  # an older checkout
    pass
settings = load_settings()
ref = resolve_model(sys.argv[1], settings)
t1 = T()
engine = Engine(ref, settings).start(); engine.wait_loaded()
end = T()
print(json.dumps({"engine_load_s": round(end - t1, 3), "with_imports_s": round(end - t0, 3),
                  "import_mlx_lm_s": round(t_mlx - t0, 3),
                  "steps": {k: round(b - a, 3) for k, (a, b) in spans.items()},
                  "dtype": engine.dtype}))
"""


CACHE_DIR = os.environ.get("MLXC_CACHE_DIR") or tempfile.mkdtemp(prefix="mlxc-switch-")


def load_runs(model: str, rounds: int, source: str | None = None,
              imported: bool = False) -> list[dict]:
    """`rounds` fresh processes, each loading `model` once; `source`: another checkout's
    mlxc (a git worktree of an older commit), for old/new figures taken side by side. They
    share one cache folder: the memory gate's measurement, taken by the first load of all
    (a warm-up, see main), is remembered as on a user's second start."""
    env = dict(os.environ, MLXC_CACHE_DIR=CACHE_DIR)
    if source:
        env["PYTHONPATH"] = source
    runs = []
    for _ in range(rounds):
        order = "imported" if imported else "serve"
        out = subprocess.run([sys.executable, "-c", STEPS, model, order], env=env, text=True,
                             capture_output=True, check=True, cwd=source or None).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return runs


def summary(runs: list[dict], imported: bool = False) -> dict:
    steps = {k for r in runs for k in r["steps"]}
    return {
        "median_engine_load_s": statistics.median(r["engine_load_s"] for r in runs),
        "median_with_imports_s": statistics.median(r["with_imports_s"] for r in runs),
        **({"median_import_mlx_lm_s": statistics.median(r["import_mlx_lm_s"] for r in runs)}
           if imported else {}),
        "median_steps_s (may overlap)": {
            k: statistics.median(r["steps"].get(k, 0.0) for r in runs) for k in sorted(steps)},
        "dtype": runs[0]["dtype"],
        "runs": len(runs),
    }


def switching(model: str, rounds: int) -> dict:
    from mlxc.config import load_settings
    from mlxc.request import GenerationRequest
    from mlxc.server.model_pool import ModelPool

    scratch = Path(tempfile.mkdtemp(prefix="mlxc-switch-"))
    settings = load_settings().with_overrides(cache_dir=scratch / "cache")
    class TwoOfOne(ModelPool):  # the pool refuses one folder twice: allowed here, see below
        def _check_unique(self) -> None:
            pass

    pool = TwoOfOne(settings, [f"a={model}", f"b={model}"], max_models=2)
    # Same folder twice is refused by the pool (it would be one model); so b runs at
    # another dtype: a second engine, a second fingerprint, as a second model would.
    pool.models[1].service.settings = settings.with_overrides(dtype="float16")
    a, b = (m.service for m in pool.models)

    def ask(service, i: int) -> float:
        request = GenerationRequest(messages=[{"role": "user", "content": f"Say {i}."}],
                                    max_tokens=4)
        started = time.perf_counter()
        service.start(request, read=False, write=False).result()
        return time.perf_counter() - started

    try:
        first = {"a": ask(a, -1), "b": ask(b, -2)}  # each loads here
        same, switched, last = [], [], None
        for i in range(rounds * 2):
            for name, service in (("a", a), ("a", a), ("b", b)):
                seconds = ask(service, i * 10 + len(same) + len(switched))
                (switched if last not in (None, name) else same).append(seconds)
                last = name
        rows = {row["name"]: row for row in pool.figures()}
        return {
            "first_request_s (load included)": {k: round(v, 3) for k, v in first.items()},
            "loads": {k: rows[k]["loads"] for k in rows},
            "load_seconds": {k: rows[k]["load_seconds"] for k in rows},
            "median_same_model_s": round(statistics.median(same), 4),
            "median_switched_model_s": round(statistics.median(switched), 4),
            "requests": len(same) + len(switched),
        }
    finally:
        pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--load-only", action="store_true", help="skip part 2 (switching)")
    parser.add_argument("--against", metavar="DIR",
                        help="another checkout (git worktree of an older commit): its load "
                             "and this one's, taken in turns, each a fresh process")
    parser.add_argument("--imported", action="store_true",
                        help="import mlx-lm before the engine starts and time each step (the "
                             "engine's load then leaves the import out); by default the "
                             "process imports what `mlxc serve` does, and the engine imports "
                             "mlx-lm as it loads")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    first = args.imported
    load_runs(args.model, 1)  # warm-up, not counted: the memory gate measures once
    if args.against:  # in turns, so a shared machine's load falls on both alike
        mine, theirs = [], []
        for _ in range(args.rounds):
            theirs += load_runs(args.model, 1, args.against, first)
            mine += load_runs(args.model, 1, imported=first)
        out = {"this": summary(mine, first), "against": summary(theirs, first)}
        out["engine_load_ratio"] = round(out["against"]["median_engine_load_s"]
                                         / out["this"]["median_engine_load_s"], 2)
        out["with_imports_ratio"] = round(out["against"]["median_with_imports_s"]
                                          / out["this"]["median_with_imports_s"], 2)
    else:
        out = summary(load_runs(args.model, args.rounds, imported=first), first)
    if not args.load_only:
        out["switching"] = switching(args.model, args.rounds)
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

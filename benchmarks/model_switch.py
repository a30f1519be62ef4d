"""Several models behind one server (issue 26): how long loading the default model from
mlxc's folder takes, where that time goes, and what switching between two loaded models
costs (target: no reload; loading <= 1.5 s on the 2-core CPU).

    python benchmarks/model_switch.py [--model PATH] [--rounds 5] [--json]

Part 1, in a fresh process per run (imports counted, as a server pays them): the engine's
load of the default model, timed step by step (optimised BLAS, `import mlx_lm`,
`mlx_lm.load`, dtype, prefix cache, memory gate; the rest is the scheduler).
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
import time, json, sys
t0 = time.perf_counter(); marks = {}
from mlxc.config import load_settings
from mlxc.model.blas import load_optimised_blas
load_optimised_blas(); marks["blas"] = time.perf_counter()
import mlx.core, mlx_lm; marks["import mlx_lm"] = time.perf_counter()
from mlxc.engine import worker
import mlxc.engine.kv.cache as kv, mlxc.engine.batch.admission as adm
from mlxc.model import dtype as dt
orig_load = mlx_lm.load
def load(*a, **k):
    r = orig_load(*a, **k); marks["mlx_lm.load"] = time.perf_counter(); return r
mlx_lm.load = load
orig_apply = dt.apply_dtype
def apply(*a, **k):
    r = orig_apply(*a, **k); marks["dtype"] = time.perf_counter(); return r
dt.apply_dtype = apply
orig_pc = kv.PrefixCache.__init__
def pc(self, *a, **k):
    orig_pc(self, *a, **k); marks["prefix cache"] = time.perf_counter()
kv.PrefixCache.__init__ = pc
orig_gate = adm.MemoryGate.for_model.__func__
def gate(cls, *a, **k):
    r = orig_gate(cls, *a, **k); marks["memory gate"] = time.perf_counter(); return r
adm.MemoryGate.for_model = classmethod(gate)
from mlxc.engine.worker import Engine
from mlxc.model.refs import resolve_model
settings = load_settings()
ref = resolve_model(sys.argv[1], settings)
t1 = time.perf_counter()
engine = Engine(ref, settings).start(); engine.wait_loaded()
end = time.perf_counter()
order = ["blas", "import mlx_lm", "mlx_lm.load", "dtype", "prefix cache", "memory gate"]
prev, steps = t0, {}
for name in order:
    steps[name] = round(marks[name] - prev, 3); prev = marks[name]
steps["scheduler and rest"] = round(end - prev, 3)
print(json.dumps({"engine_load_s": round(end - t1, 3), "with_imports_s": round(end - t0, 3),
                  "steps": steps}))
"""


def load_runs(model: str, rounds: int) -> list[dict]:
    env = dict(os.environ)
    env.setdefault("MLXC_CACHE_DIR", tempfile.mkdtemp(prefix="mlxc-switch-"))
    runs = []
    for _ in range(rounds):
        out = subprocess.run([sys.executable, "-c", STEPS, model], env=env, text=True,
                             capture_output=True, check=True).stdout
        runs.append(json.loads(out.strip().splitlines()[-1]))
    return runs


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
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = load_runs(args.model, args.rounds)
    out = {
        "median_engine_load_s": statistics.median(r["engine_load_s"] for r in runs),
        "median_with_imports_s": statistics.median(r["with_imports_s"] for r in runs),
        "median_steps_s": {k: statistics.median(r["steps"][k] for r in runs)
                           for k in runs[0]["steps"]},
        "switching": switching(args.model, args.rounds),
    }
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

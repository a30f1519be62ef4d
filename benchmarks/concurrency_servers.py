"""4 concurrent clients against `mlxc serve` and `mlx_lm.server`, side by side in one run.

    python benchmarks/concurrency_servers.py [--model FOLDER] [--clients 4] [--tokens 32]
                                             [--rounds 2] [--json]

Both servers get the same weights in float32 (mlxc's CPU default; mlx_lm.server is handed a
float32 copy saved once) and the same OpenBLAS, loaded before MLX (mlx_lm.server is started
through a two-line launcher that loads it first), so the comparison is fair. They run one at
a time. Per server and round: the same `--clients` different greedy chat requests, first one
after another (sequential sum of their end-to-end times), then all at once (wall time);
reported is wall ÷ sequential sum (mlxc's target: <= 0.5, and <= mlx_lm.server's), and for
mlxc the slowest /health answer while the concurrent requests ran (target: <= 20 ms).
mlxc is sent `Cache-Control: no-cache, no-store`: every request is generated.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from shared import free_port  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TOPICS = ["the sea", "a mountain", "a library", "the moon", "a fox", "a city", "rain", "bread"]
LAUNCH_MLX_LM = (  # OpenBLAS before the first `import mlx.core`, as mlxc does
    "from mlxc.model.blas import load_optimised_blas; load_optimised_blas()\n"
    "import sys; from mlx_lm.server import main; sys.argv[0] = 'mlx_lm.server'; main()\n"
)


def float32_copy(source: Path, out: Path) -> Path:
    """The model's weights dequantized to float32 (what mlxc runs on a CPU), saved once."""
    if (out / "config.json").exists():
        return out
    code = (
        "import json, shutil, sys\n"
        "from pathlib import Path\n"
        "from mlxc.model.blas import load_optimised_blas; load_optimised_blas()\n"
        "from mlx_lm import load\n"
        "from mlx_lm.utils import save_model\n"
        "from mlxc.model.dtype import apply_dtype\n"
        "src, dst = Path(sys.argv[1]), Path(sys.argv[2])\n"
        "model, tokenizer = load(str(src))\n"
        "apply_dtype(model, 'float32')\n"
        "save_model(dst, model)\n"
        "config = json.loads((src / 'config.json').read_text())\n"
        "config.pop('quantization', None); config.pop('quantization_config', None)\n"
        "(dst / 'config.json').write_text(json.dumps(config))\n"
        "tokenizer.save_pretrained(dst)\n"
        "for extra in ('chat_template.jinja', 'generation_config.json'):\n"
        "    if (src / extra).exists(): shutil.copy(src / extra, dst / extra)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(source), str(out)], check=True, env=_env())
    return out


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXC_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return {**env, **extra}


@contextmanager
def running(cmd: list[str], env: dict[str, str], probe: str):
    port = free_port()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    proc = subprocess.Popen([*cmd, "--port", str(port)], env=env, stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + probe, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{cmd[:4]} did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def chat(url: str, text: str, tokens: int, model: str = "default") -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": text}],
            "max_tokens": tokens, "temperature": 0.0, "stream": True}
    headers = {"Cache-Control": "no-cache, no-store"}
    started, first, parts = time.perf_counter(), None, []
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers,
                      timeout=3600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                for choice in json.loads(line[6:]).get("choices", []):
                    if piece := (choice.get("delta") or {}).get("content"):
                        first = first or time.perf_counter()
                        parts.append(piece)
    end = time.perf_counter()
    return {"e2e": end - started, "ttft": (first or end) - started, "text": "".join(parts)}


def concurrently(url: str, prompts: list[str], tokens: int, model: str,
                 health_ms: list[float] | None) -> tuple[float, list[dict]]:
    """All prompts at once; (wall seconds, answers). With `health_ms`, /health is polled
    every 50 ms meanwhile and each answer's time appended."""
    out: list[dict] = [{} for _ in prompts]
    done = threading.Event()

    def poll() -> None:
        # One kept-alive client: a new httpx client per call costs ~70 ms here by itself.
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                started = time.perf_counter()
                client.get(f"{url}/health")
                health_ms.append(1000 * (time.perf_counter() - started))
                time.sleep(0.05)

    def run(i: int) -> None:
        out[i] = chat(url, prompts[i], tokens, model)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    poller = threading.Thread(target=poll)
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    if health_ms is not None:
        poller.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    done.set()
    if health_ms is not None:
        poller.join()
    return wall, out


def measure(url: str, clients: int, tokens: int, rounds: int, health: bool,
            model: str = "default") -> dict:
    chat(url, "Say hello.", 4, model)  # first-call costs are no round's
    ratios, walls, sums, health_ms, same = [], [], [], [], 0
    for r in range(rounds):
        prompts = [f"({r}.{i}) Write a short story about {TOPICS[i % len(TOPICS)]}."
                   for i in range(clients)]
        sequential = [chat(url, p, tokens, model) for p in prompts]
        wall, out = concurrently(url, prompts, tokens, model, None)
        ratios.append(wall / sum(s["e2e"] for s in sequential))
        walls.append(wall)
        sums.append(sum(s["e2e"] for s in sequential))
        same += sum(a["text"] == b["text"] for a, b in zip(sequential, out, strict=True))
    if health:  # one more concurrent round, /health polled meanwhile (not in the ratio)
        concurrently(url, [f"(h.{i}) Tell me about {TOPICS[i % len(TOPICS)]}."
                           for i in range(clients)], tokens, model, health_ms)
    result = {"ratio": round(statistics.median(ratios), 3), "ratios": [round(x, 3) for x in ratios],
              "wall_seconds": [round(x, 2) for x in walls],
              "sequential_sum_seconds": [round(x, 2) for x in sums],
              "same_text_as_sequential": f"{same}/{clients * rounds}"}
    if health_ms:
        result["health_max_ms"] = round(max(health_ms), 1)
        result["health_median_ms"] = round(statistics.median(health_ms), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="model folder (default: mlxc's default model)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.model:
        folder = Path(args.model)
    else:
        from mlxc.config import load_settings
        from mlxc.model.refs import prepare_model, resolve_model

        settings = load_settings()
        ref = resolve_model(settings.model, settings)
        prepare_model(ref, lambda _msg: None)
        folder = ref.folder
    scratch = Path(tempfile.mkdtemp(prefix="mlxc-servers-"))
    f32 = float32_copy(folder, Path(tempfile.gettempdir()) / f"mlxc-f32-{folder.name}")
    out: dict = {"model": str(folder), "clients": args.clients, "tokens": args.tokens}
    mlxc_cmd = [sys.executable, "-m", "mlxc", "serve", "-m", str(folder), "--dtype", "float32"]
    env = _env(MLXC_CACHE_DIR=str(scratch / "cache"), MLXC_MODELS_DIR=str(scratch / "models"))
    with running(mlxc_cmd, env, "/health") as url:
        out["mlxc"] = measure(url, args.clients, args.tokens, args.rounds, health=True)
    print(json.dumps({"mlxc": out["mlxc"]}), file=sys.stderr)
    with running([sys.executable, "-c", LAUNCH_MLX_LM, "--model", str(f32), "--log-level",
                  "WARNING"], _env(), "/v1/models") as url:
        # mlx_lm.server loads whatever `model` names: its own folder is the loaded one.
        out["mlx_lm"] = measure(url, args.clients, args.tokens, args.rounds, health=False,
                                model=str(f32))
    print(json.dumps(out, indent=None if args.json else 2))


if __name__ == "__main__":
    main()

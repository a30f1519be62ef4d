"""Two CPU ranks over MLX's ring backend on loopback, started by `mlx.launch` and ended by
the test (bounded time): the tiny llama split tensor-parallel (mlx-lm's model.shard) gives the
greedy answers one process gives on >= 19 of 20 prompts; each difference is printed with the
one-process logit gap at its first differing token (reduction order)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PROMPTS = [f"Question {n}: what is {n} plus {n}?" for n in range(20)]


def check(model: Path, out: Path, prompts: Path, ranks: int) -> dict:
    command = [sys.executable, "-m", "mlxc.distributed.check", str(model), str(prompts),
               str(out), "--parallel", "tensor", "--max-tokens", "12"]
    if ranks > 1:
        launch = Path(sys.executable).with_name("mlx.launch")
        command = [str(launch), "-n", str(ranks), "--backend", "ring", "--python",
                   sys.executable, "--", *command[1:]]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXC_")}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(out.read_text())


def test_tensor_parallel_over_two_ring_ranks_answers_as_one_process(tmp_path, tiny_model):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps(PROMPTS))
    one = check(tiny_model, tmp_path / "one.json", prompts, 1)
    two = check(tiny_model, tmp_path / "two.json", prompts, 2)
    assert one["world"]["size"] == 1
    assert two["world"]["size"] == 2 and two["world"]["backend"] == "ring"
    assert two["layout"] == "tensor"
    same = 0
    for n, (a, b) in enumerate(zip(one["answers"], two["answers"], strict=True)):
        if a["tokens"] == b["tokens"]:
            same += 1
            continue
        pairs = enumerate(zip(a["tokens"], b["tokens"], strict=False))
        at = next((i for i, (x, y) in pairs if x != y), len(b["tokens"]) - 1)
        print(f"prompt {n}: differs at token {at}, logit gap {a['gaps'][at]:.2e}")
    assert same >= 19, same

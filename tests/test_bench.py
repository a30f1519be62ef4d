"""`mlxc bench` end to end, in-process and against a real `mlxc serve`, on the tiny model."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import run_mlxc
from live_server import free_port, not_openai, served  # noqa: F401  (fixtures)

from mlxc.bench_report import percentile

SCENARIOS = {"miss", "hit", "follow-up", "concurrent"}
METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")


def bench(env, tmp_path, *args):
    out_json, out_png = tmp_path / "bench.json", tmp_path / "bench.png"
    result = run_mlxc("bench", "-n", "2", "-c", "2", "--max-tokens", "8",
                      "--json", str(out_json), "--plot", str(out_png), *args, env=env)
    assert result.returncode == 0, result.stderr
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out_png.stat().st_size > 5000
    return result, json.loads(out_json.read_text())


def check_figures(report: dict, scenarios: set[str]) -> None:
    assert set(report["scenarios"]) == scenarios
    for name, figures in report["scenarios"].items():
        assert figures["requests"] == len(report["samples"][name]) == 2
        for metric in ("ttft_ms", "e2e_ms"):
            stats = figures[metric]
            assert 0 < stats["median"] <= stats["p95"] <= stats["p99"], (name, metric, stats)
    assert report["scenarios"]["miss"]["cache"] == {"miss": 2}
    assert report["scenarios"]["hit"]["cache"] == {"hit": 2}
    assert report["scenarios"]["follow-up"]["cached_tokens"] > 0  # the prefix was reused
    assert report["speedup"]["hit_vs_miss_e2e"] > 0
    assert report["identical"]["hit"] == {"same": 2, "compared": 2}
    assert report["greedy"] and report["max_tokens"] == 8


def test_in_process_bench_uses_a_throwaway_cache(mlxc_env, tmp_path):
    result, report = bench(mlxc_env, tmp_path)
    check_figures(report, SCENARIOS | {"reference"})
    assert report["target"] == "in-process"
    # in-process a hit skips the model and HTTP alike (over loopback the tiny model's misses
    # take about as long as a round trip, so only here is the sign certain)
    assert report["speedup"]["hit_vs_miss_e2e"] > 1
    # the same follow-ups on an engine without a prefix cache: nothing reused, same answers
    assert report["scenarios"]["reference"]["cached_tokens"] == 0
    assert report["identical"]["prefix reuse"] == {"same": 2, "compared": 2}
    assert report["speedup"]["follow_up_ttft_prefix"] > 0
    for label in ("TTFT", "ITL", "TPOT", "E2E", "hit vs miss"):
        assert label in result.stdout
    assert not Path(mlxc_env["MLXC_CACHE_DIR"]).exists()  # the user's cache was not touched


def test_bench_against_a_running_server(served, tmp_path):  # noqa: F811
    url, env = served
    result, report = bench(env, tmp_path, "--url", url)
    check_figures(report, SCENARIOS)
    assert report["target"] == url and "reference" not in report["identical"]


def test_bad_input_is_one_line(mlxc_env, tmp_path, not_openai):  # noqa: F811
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    cases = [
        (("--prompts", str(tmp_path / "missing.jsonl")), "no such file"),
        (("--prompts", str(empty)), "is empty"),
        (("--prompts", str(bad)), "line 2: not JSON"),
        (("--url", f"http://127.0.0.1:{free_port()}"), "cannot reach"),
        (("--url", not_openai), "not an OpenAI-compatible server"),
        (("--json", str(tmp_path / "no" / "such" / "dir.json")), "does not exist"),
    ]
    for args, message in cases:
        result = run_mlxc("bench", *args, env=mlxc_env)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlxc: error:") and message in lines[0]
    assert not Path(mlxc_env["MLXC_CACHE_DIR"]).exists()


def test_percentiles_match_numpy():
    rng = random.Random(5)
    for n in (1, 2, 7, 100):
        values = [rng.lognormvariate(0, 2) for _ in range(n)]
        for q in (50, 95, 99):
            assert percentile(values, q) == pytest.approx(np.percentile(values, q), rel=1e-12)

"""`mlxc cache warm` end to end: real processes, the tiny model, a real disk cache, and a real
`mlxc serve` for --url."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import run_mlxc, sigint_default
from live_server import free_port, not_openai, served  # noqa: F401  (fixtures)

from mlxc.config import Settings
from mlxc.store import open_store


def write(path: Path, *lines) -> Path:
    path.write_text("".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines))
    return path


def warm(env, *args, input=None):
    result = run_mlxc("cache", "warm", *args, "--json", env=env, input=input)
    return result, (json.loads(result.stdout) if result.stdout.strip() else None)


def ask(env, *args) -> dict:
    result = run_mlxc("ask", *args, "--json", env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def stored(env) -> int:
    store = open_store(Settings(cache_dir=Path(env["MLXC_CACHE_DIR"])))
    try:
        return store.stats().cached_items
    finally:
        store.close()


def test_warmed_lines_are_hits_for_ask_and_a_rerun_skips_them(mlxc_env, tmp_path):
    prompts = write(
        tmp_path / "p.jsonl",
        {"prompt": "What is MLX?", "max_tokens": 8},
        {"prompt": "Paris", "system": "Be brief", "max_tokens": 8, "seed": 3},
        "",
        {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "id": "x1"},
        {"prompt": "What is MLX?", "max_tokens": 8},  # the same request twice: run once
    )
    result, summary = warm(mlxc_env, str(prompts))
    assert result.returncode == 0, result.stderr
    assert (summary["lines"], summary["warmed"], summary["cached"]) == (4, 3, 1)
    assert summary["failed"] == 0 and summary["tokens"] > 0
    assert ask(mlxc_env, "What is MLX?", "--max-tokens", "8")["cached"]
    assert ask(mlxc_env, "Paris", "-s", "Be brief", "--max-tokens", "8", "--seed", "3")["cached"]
    assert ask(mlxc_env, "Hi", "--max-tokens", "8")["cached"]
    again, summary = warm(mlxc_env, str(prompts))
    assert again.returncode == 0 and (summary["warmed"], summary["cached"]) == (0, 4)
    stats = json.loads(run_mlxc("cache", "stats", "--json", env=mlxc_env).stdout)
    # a warm-up is not traffic: only the three asks were counted
    assert (stats["hits"], stats["misses"], stats["cached_items"]) == (3, 0, 3)


def test_stdin_and_table(mlxc_env):
    line = '{"prompt": "Hello", "max_tokens": 6}\n'
    result = run_mlxc("cache", "warm", "-", env=mlxc_env, input=line)
    assert result.returncode == 0, result.stderr
    assert "warmed" in result.stdout and "stdin" in result.stdout
    assert ask(mlxc_env, "Hello", "--max-tokens", "6")["cached"]


def test_bad_lines_are_reported_by_number_and_skipped(mlxc_env, tmp_path):
    prompts = write(
        tmp_path / "bad.jsonl",
        {"prompt": "Good one", "max_tokens": 6},
        "not json",
        {"prompt": 3},
        "[1, 2]",
        {"prompt": "Zero", "max_tokens": 0},
        {"prompt": "Sampled", "temperature": 0.7},
        "",
        {"foo": 1},
        {"prompt": "Another good one", "max_tokens": 6},
    )
    strict, summary = warm(mlxc_env, str(prompts), "--strict")
    assert strict.returncode == 1 and summary["failed"] == 1 and summary["warmed"] == 0
    assert "line 2: not JSON" in strict.stderr and "line 3" not in strict.stderr
    assert stored(mlxc_env) == 0

    result, summary = warm(mlxc_env, str(prompts))
    assert result.returncode == 1
    assert (summary["warmed"], summary["failed"]) == (2, 6)
    assert [f["line"] for f in summary["failures"]] == [2, 3, 4, 5, 6, 8]
    for expected in ("line 2: not JSON", "line 3: prompt: must be a string", "line 4: not a JSON",
                     "line 5: max_tokens", "line 6: not cacheable", "line 8: no \"prompt\""):
        assert expected in result.stderr
    assert stored(mlxc_env) == 2


def test_bad_input_is_one_line_and_changes_nothing(mlxc_env, tmp_path, not_openai):  # noqa: F811
    empty = write(tmp_path / "empty.jsonl", "", "  ")
    good = write(tmp_path / "good.jsonl", {"prompt": "Hi"})
    cases = [
        ((str(tmp_path / "missing.jsonl"),), "no such file"),
        ((str(empty),), "is empty"),
        ((str(tmp_path),), "is a folder"),
        ((str(good), "--url", f"127.0.0.1:{free_port()}"), "cannot reach"),
        ((str(good), "--url", not_openai), "is not an OpenAI-compatible server"),
        ((str(good), "--url", not_openai, "--prefix-only"), "--prefix-only"),
    ]
    for args, message in cases:
        result = run_mlxc("cache", "warm", *args, env=mlxc_env)
        assert result.returncode == 1, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("mlxc: error:") and message in lines[0]
        assert result.stdout == ""
    assert not Path(mlxc_env["MLXC_CACHE_DIR"]).exists()


def test_ctrl_c_keeps_what_finished_and_a_rerun_resumes(mlxc_env, tmp_path):
    lines = [{"prompt": f"Story number {i}", "max_tokens": 900} for i in range(12)]
    prompts = write(tmp_path / "long.jsonl", *lines)
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxc", "cache", "warm", str(prompts), "--json"],
        env=mlxc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        preexec_fn=sigint_default,
    )
    deadline = time.monotonic() + 120
    while not Path(mlxc_env["MLXC_CACHE_DIR"], "responses").exists() or stored(mlxc_env) < 1:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    summary = json.loads(out)
    kept = stored(mlxc_env)
    assert summary["interrupted"] and 1 <= summary["warmed"] == kept < len(lines)
    assert "Traceback" not in err

    # The kept lines are skipped; the one cut short was not stored, so it runs now.
    resume = write(tmp_path / "resume.jsonl", *lines[: kept + 1])
    result, summary = warm(mlxc_env, str(resume))
    assert result.returncode == 0, result.stderr
    assert (summary["cached"], summary["warmed"]) == (kept, 1)


def test_prefix_only_fills_the_prefix_cache_not_the_answers(mlxc_env, tmp_path):
    prompts = write(tmp_path / "sys.jsonl",
                    {"system": "You are a terse assistant. " * 8, "prompt": "Hi"})
    result, summary = warm(mlxc_env, str(prompts), "--prefix-only")
    assert result.returncode == 0, result.stderr
    assert summary["warmed"] == 1 and summary["tokens"] > 16
    stats = json.loads(run_mlxc("cache", "stats", "--json", env=mlxc_env).stdout)
    assert stats["cached_items"] == 0 and stats["prefix"]["disk_entries"] >= 1


def test_url_warms_through_a_running_server(served, tmp_path):  # noqa: F811
    url, env = served
    prompts = write(
        tmp_path / "p.jsonl",
        {"prompt": "Served question", "max_tokens": 8},
        {"messages": [{"role": "user", "content": "Served hello"}], "max_tokens": 8},
        {"prompt": "Other model", "model": "not-this-one"},
    )
    result, summary = warm(env, str(prompts), "--url", url)
    assert result.returncode == 1  # the third line names a model the server does not run
    assert (summary["warmed"], summary["failed"]) == (2, 1)
    assert "line 3:" in result.stderr and "not-this-one" in result.stderr
    assert ask(env, "Served question", "--max-tokens", "8")["cached"]
    again, summary = warm(env, str(prompts), "--url", url)
    assert (summary["warmed"], summary["cached"]) == (0, 2)

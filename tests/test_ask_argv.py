"""`mlxc ask`'s command line read without typer (cli/ask_argv.py) reads as typer reads it, and
leaves typer everything else."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

import mlxc.cli.ask as ask_command
from mlxc.cli import app
from mlxc.cli.ask_argv import parse_ask

READ_BOTH_WAYS = [
    ["What is MLX?"],
    [],
    ["q", "--max-tokens", "12", "--json"],
    ["--max-tokens=12", "q", "--seed=0"],
    ["-s", "Be brief", "q", "-m", "org/model", "-t", "0.8", "--seed", "7", "--top-p", "0.9"],
    ["q", "--system", "a -b", "--model", ""],
    ["q", "--cache-dir", "~/x", "--cache-policy", "all", "--dtype", "float32"],
    ["q", "--no-cache", "--refresh", "--continue", "-c", "--json", "--json"],
    ["q", "--max-tokens", "-3", "-t", "1", "--temperature", "2.50", "--top-p", "0"],
    ["q", "--max-tokens", "1", "--max-tokens", "2"],  # the last one counts
    ["", "--seed", "18446744073709551"],
]
LEFT_TO_TYPER = [
    ["--help"], ["q", "-h"], ["q", "-t0.8"], ["q", "-s=x"], ["q", "--bogus"], ["a", "b"],
    ["q", "-s"], ["q", "-m", "-x"], ["q", "--"], ["q", "--max-tokens", "1e3"],
    ["q", "--max-tokens", "007"], ["q", "--max-tokens", " 5"], ["q", "-t", ".5"],
    ["q", "--json=1"], ["q", "--cache-dir", ""], ["q", "-"], ["q", "--system", "-"],
]


def typer_reads(argv: list[str], monkeypatch):
    seen = []
    monkeypatch.setattr(ask_command, "run_ask", lambda args: seen.append(args) or 0)
    result = CliRunner().invoke(app, ["ask", *argv])
    assert result.exit_code == 0, result.output
    return seen[0]


@pytest.mark.parametrize("argv", READ_BOTH_WAYS)
def test_the_common_forms_read_as_typer_reads_them(argv, monkeypatch):
    assert parse_ask(argv) == typer_reads(argv, monkeypatch)


@pytest.mark.parametrize("argv", LEFT_TO_TYPER)
def test_the_rest_is_left_to_typer(argv):
    assert parse_ask(argv) is None


def test_shell_completion_is_left_to_typer(monkeypatch):
    monkeypatch.setenv("_MLXC_COMPLETE", "bash_complete")
    assert parse_ask(["q"]) is None

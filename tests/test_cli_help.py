"""Every `--help` looks alike: flags show no value, environment variables one form."""

from __future__ import annotations

import os
import re

import typer
from conftest import run_mlxc
from typer.testing import CliRunner

from mlxc.cli import app

WIDE = {"COLUMNS": "1000"}  # one line per option: a wrapped "[env:" is not a second form


def command_paths(group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [prefix]
    for name, command in group.commands.items():
        if hasattr(command, "commands"):  # a group (typer's own click: not click.Group)
            paths += command_paths(command, (*prefix, name))
        else:
            paths.append((*prefix, name))
    return paths


def help_of(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(app, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return result.output


def test_every_help_shows_no_value_for_flags_and_one_env_form():
    paths = command_paths(typer.main.get_command(app))
    assert ("ask",) in paths and ("cache", "warm") in paths and ("serve",) in paths
    for path in paths:
        text = help_of(path)
        assert "<bool>" not in text, (path, text)
        named = re.findall(r"MLXC_\w+", text)
        in_form = re.findall(r"\[env: (MLXC_\w+)\]", text)
        assert named == in_form, (path, named, in_form)  # no "[env var: X]", "(env: X)"
        assert len(set(in_form)) == len(in_form), (path, in_form)  # and each once
    ask = help_of(("ask",))
    assert re.search(r"--no-cache +Neither", ask)  # a flag: straight to its help
    assert re.search(r"--max-tokens +<int> +Most", ask)  # an option still shows its type
    assert "[env: MLXC_MODEL]" in ask and "[env: MLXC_CACHE_DIR]" in ask


def test_the_real_command_line_renders_the_same():
    result = run_mlxc("serve", "--help", env={**os.environ, **WIDE})
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout and "env var" not in result.stdout
    assert "[env: MLXC_API_KEY]" in result.stdout and "[env: MLXC_MAX_KV_MEMORY]" in result.stdout

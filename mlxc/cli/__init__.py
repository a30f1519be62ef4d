"""The `mlxc` command line: thin commands over mlxc.service, rendered with Rich.

`main` answers the common forms of `mlxc ask` without building the Typer app (cli/commands.py):
a cache hit is then mostly Python's start-up, pydantic and SQLite."""

from __future__ import annotations

import errno
import os
import sys

# Pydantic scans every installed distribution for plugins on first use (~25 ms): too much
# for a cache hit that should take a blink. mlxc's command line uses no pydantic plugin.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")


def __getattr__(name: str):
    if name == "app":  # `from mlxc.cli import app`: the Typer app, built when asked for
        from mlxc.cli.commands import app

        return app
    raise AttributeError(name)


def main() -> None:
    """Entry point: known errors become one line on stderr and exit code 1, not a traceback."""
    try:
        if (code := _ask_without_typer(sys.argv[1:])) is None:
            from mlxc.cli.commands import app

            app()
    except Exception as exc:
        from mlxc.errors import USER_ERRORS, describe  # pydantic's error among them

        if not isinstance(exc, USER_ERRORS):
            raise
        print(f"mlxc: error: {describe(exc)}", file=sys.stderr)
        sys.exit(1)
    sys.exit(code)


def _ask_without_typer(argv: list[str]) -> int | None:
    """`mlxc ask ...` run directly when ask_argv reads it; None for typer to run. Ends as
    typer's commands end: Ctrl-C 130, a closed stdout 1 without a traceback."""
    if argv[:1] != ["ask"]:
        return None
    from mlxc.cli.ask_argv import parse_ask

    if (args := parse_ask(argv[1:])) is None:
        return None
    from mlxc.cli.ask_flow import run_ask
    from mlxc.cli.ask_hit import look_up, print_hit

    try:
        if (found := look_up(args)).answer is not None:
            print_hit(args, found)
            return 0
        return run_ask(args, missed_key=found.key)  # a miss: Rich, pydantic, the engine
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        if exc.errno != errno.EPIPE:
            raise
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        return 1

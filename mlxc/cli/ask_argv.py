"""`mlxc ask`'s arguments read without typer, for the forms people type: typer's command
tree, its per-option pydantic adapters and Rich cost a cache hit more than the hit itself.

A strict subset of what typer accepts, giving the same values: anything else (--help, an
unknown or attached option, a value typer might read otherwise) returns None, and typer
parses the command line as usual, with its own errors and help.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from mlxc.cli.ask_flow import AskArgs

_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_FLOAT = re.compile(r"-?(?:0|[1-9][0-9]{0,8})(?:\.[0-9]{1,9})?")
_VALUED = {
    "-s": ("system", str), "--system": ("system", str),
    "-m": ("model", str), "--model": ("model", str),
    "--max-tokens": ("max_tokens", _INT), "--seed": ("seed", _INT),
    "-t": ("temperature", _FLOAT), "--temperature": ("temperature", _FLOAT),
    "--top-p": ("top_p", _FLOAT),
    "--cache-dir": ("cache_dir", Path), "--cache-policy": ("cache_policy", str),
    "--dtype": ("dtype", str),
    "--speculate": ("speculate", str), "--draft-model": ("draft_model", str),
}
_FLAGS = {
    "--no-cache": "no_cache", "--refresh": "refresh", "--json": "as_json",
    "-c": "continue_", "--continue": "continue_",
}


def parse_ask(argv: list[str]) -> AskArgs | None:
    """`argv` after `ask` as AskArgs, or None to leave it to typer."""
    if any(name.startswith("_") and name.endswith("_COMPLETE") for name in os.environ):
        return None  # shell completion asking typer
    values: dict = {}
    positional: list[str] = []
    tokens = iter(argv)
    for token in tokens:
        if not token.startswith("-"):
            positional.append(token)
            continue
        name, equals, attached = token.partition("=")
        if name in _FLAGS and not equals:
            values[_FLAGS[name]] = True
            continue
        if name not in _VALUED or (equals and not name.startswith("--")):
            return None  # --help, "--", "-t0.8", "-s=x", an unknown option
        value = attached if equals else next(tokens, None)
        field, kind = _VALUED[name]
        if value is None or (value.startswith("-") and kind in (str, Path)):
            return None  # typer's "requires an argument", or a value that looks like an option
        if kind is str:
            values[field] = value
        elif kind is Path:
            if not value:
                return None
            values[field] = Path(value)
        elif not kind.fullmatch(value):
            return None
        else:
            values[field] = int(value) if kind is _INT else float(value)
    if len(positional) > 1:
        return None  # typer's "unexpected extra argument"
    return AskArgs(prompt=positional[0] if positional else None, **values)

"""`mlxc models [list] | rm NAME`: the models already on this machine (Hugging Face cache, LM
Studio, Ollama, mlxc's own folder, --path), read from their headers only (model/describe.py)."""

from __future__ import annotations

import json
import shutil
import uuid
from pathlib import Path
from typing import Annotated

import typer

from mlxc.cli.options import JsonOption, settings_from

EXAMPLES = (
    "[bold]Examples[/bold]\n\n  mlxc models\n\n  mlxc models --json | jq '.[] | "
    "select(.runnable) | .name'\n\n  mlxc models --path ~/gguf --path /data/models\n\n"
    "  mlxc ask -m qwen2.5-coder:7b \"hi\"   # a name from the list\n\n"
    "  mlxc models rm SmolLM2-135M-Instruct"
)
PathOption = Annotated[list[Path] | None, typer.Option(
    "--path",
    help="Also look in this folder (repeatable; with the ':'-separated folders of "
    "\\[env: MLXC_MODEL_PATH]).",
    show_default=False)]

app = typer.Typer(help="List the models on this machine, or remove mlxc's own copies.",
                  invoke_without_command=True)


@app.callback(epilog=EXAMPLES)
def _default(ctx: typer.Context, as_json: JsonOption = False, path: PathOption = None) -> None:
    """List the models on this machine (`mlxc models list`)."""
    if ctx.invoked_subcommand is None:
        list_models(as_json, path)


@app.command("list", epilog=EXAMPLES)
def list_models(as_json: JsonOption = False, path: PathOption = None) -> None:
    """Every model found: name, architecture, parameters, quantization, context, size, where,
    and whether mlxc can run it (and why not)."""
    from mlxc.model.describe import describe_folder, describe_gguf
    from mlxc.model.discover import scan

    settings = settings_from()
    entries = scan(settings.models_dir, path or ())
    counts: dict[str, int] = {}
    for e in entries:
        counts[e.name] = counts.get(e.name, 0) + 1
    rows = []
    for e in entries:
        info = describe_gguf(e.path) if e.is_gguf else describe_folder(e.path)
        problems = ([e.problem] if e.problem else []) + info.problems
        if counts[e.name] > 1:
            problems.append(f"{counts[e.name]} models share this name: use -m {e.qualified}")
        rows.append({
            "name": e.name, "source": e.source, "qualified_name": e.qualified,
            "aliases": list(e.aliases), "format": info.format,
            "architecture": info.architecture, "parameters": info.parameters,
            "quantization": info.quantization, "context_length": info.context_length,
            "size_bytes": info.size_bytes, "path": str(e.path), "origin": e.origin,
            "runnable": not problems, "why_not": problems,
        })
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    _table(rows)


def _table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    from mlxc.cli.cache import _human

    console = Console()
    if not rows:
        console.print("No models found (looked in the Hugging Face cache, LM Studio, Ollama "
                      "and mlxc's folder). Pass --path DIR to look elsewhere.")
        return
    table = Table(box=None, header_style="bold")
    for col in ("name", "source", "arch", "params", "quant", "context", "size", "runs"):
        table.add_column(col)
    for r in rows:
        params = f"{r['parameters'] / 1e9:.2f}B" if r["parameters"] else "?"
        runs = "yes" if r["runnable"] else "no: " + "; ".join(r["why_not"])
        table.add_row(r["name"], r["source"], r["architecture"] or "?", params,
                      str(r["quantization"] or "?"), str(r["context_length"] or "?"),
                      _human(r["size_bytes"]), runs)
    console.print(table)


@app.command("rm", epilog="[bold]Examples[/bold]\n\n  mlxc models rm SmolLM2-135M-Instruct\n\n"
             "  mlxc models rm qwen2.5-coder:7b   # mlxc's converted copy; Ollama's stays")
def remove(name: Annotated[str, typer.Argument(help="A name `mlxc models` lists.")],
           as_json: JsonOption = False) -> None:
    """Remove mlxc's own copy of a model (a conversion or a download). Models in the Hugging
    Face cache, LM Studio or Ollama are theirs: mlxc never deletes them."""
    from mlxc.errors import ModelError
    from mlxc.model.refs import resolve_model

    settings = settings_from()
    ref = resolve_model(name, settings)
    own = settings.models_dir.resolve()
    folder = ref.folder.resolve()
    if own not in folder.parents or not ref.is_ready:
        raise ModelError(
            f"{name} is at {ref.folder}, which is not a copy mlxc made (mlxc removes only what "
            f"is in {settings.models_dir}); remove it with the tool that downloaded it"
            + (" (`ollama rm`, `hf cache delete`, LM Studio)" if ref.gguf or not ref.own
               else "")
        )
    doomed = folder.with_name(f".{folder.name}.rm-{uuid.uuid4().hex[:8]}")
    folder.rename(doomed)  # gone at once for every reader; no half folder left as a model
    shutil.rmtree(doomed, ignore_errors=True)
    if as_json:
        typer.echo(json.dumps({"removed": str(folder), "name": name}))
    else:
        typer.echo(f"removed {folder}")

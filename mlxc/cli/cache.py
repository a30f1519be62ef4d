"""`mlxc cache stats|clear`: look at and empty the caches. Never imports MLX."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mlxc.cli.options import CacheDirOption, JsonOption, settings_from

app = typer.Typer(
    help="Inspect, clear or warm mlxc's caches.",
    no_args_is_help=True,
)


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


@app.command(
    epilog="[bold]Examples[/bold]\n\n  mlxc cache stats\n\n  mlxc cache stats --json | jq .hit_rate"
)
def stats(cache_dir: CacheDirOption = None, as_json: JsonOption = False) -> None:
    """Hits, misses and size of the response cache (shared by every mlxc process)."""
    from mlxc.store import open_store

    settings = settings_from(cache_dir)
    store = open_store(settings)
    try:
        figures = store.stats().as_dict()
    finally:
        store.close()
    if as_json:
        typer.echo(json.dumps(figures))
        return
    table = Table(title="mlxc response cache", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("hits", str(figures["hits"]))
    table.add_row("misses", str(figures["misses"]))
    table.add_row("total requests", str(figures["total_requests"]))
    table.add_row("hit rate", f"{figures['hit_rate']:.1%}")
    table.add_row("cached items", str(figures["cached_items"]))
    table.add_row("size", f"{_human(figures['size_bytes'])} of {_human(figures['size_limit'])}")
    table.add_row("eviction", figures["eviction_policy"])
    table.add_row("where", f"{figures['backend']}: {figures['directory']}")
    Console().print(table)


@app.command(epilog="[bold]Examples[/bold]\n\n  mlxc cache clear\n\n  mlxc cache clear --yes")
def clear(
    cache_dir: CacheDirOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
) -> None:
    """Delete every cached answer and reset the statistics. Models are kept."""
    from mlxc.store import open_store

    settings = settings_from(cache_dir)
    store = open_store(settings)
    try:
        where = store.stats().directory
        if not yes and not typer.confirm(f"Delete all cached answers in {where}?"):
            raise typer.Exit(1)
        removed = store.clear()
    finally:
        store.close()
    typer.echo(f"removed {removed} cached answers from {where}")

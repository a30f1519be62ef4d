"""`mlxc cache stats|clear|warm`: look at, empty and fill the caches. Only `warm` (without
--url) loads MLX."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from mlxc.cli.options import (
    ApiKeyOption,
    CacheDirOption,
    CachePolicyOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    UrlOption,
    settings_from,
)

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
    "\n\n  mlxc cache stats --json | jq .prefix.tokens_reused"
)
def stats(
    cache_dir: CacheDirOption = None,
    as_json: JsonOption = False,
    watch: Annotated[bool, typer.Option("--watch", help="Redraw every second until Ctrl-C "
                                        "(with --url: a running server's figures).")] = False,
    url: Annotated[str | None, typer.Option("--url", help="With --watch: a running "
                                            "`mlxc serve`.", show_default=False)] = None,
    api_key: ApiKeyOption = None,
    watch_times: Annotated[int | None, typer.Option(hidden=True)] = None,  # tests
) -> None:
    """Hits, misses and size of the response cache and of the prefix (KV) cache's disk tier,
    shared by every mlxc process."""
    from mlxc.engine.kv.index import read_stats
    from mlxc.store import open_store

    settings = settings_from(cache_dir)
    if watch:  # a live view (cli/cache_live.py)
        from mlxc.cli import cache_live

        read = (cache_live.remote_figures(url, api_key) if url
                else cache_live.local_figures(settings))
        cache_live.watch_stats(read, times=watch_times)
        return
    store = open_store(settings)
    try:
        figures = store.stats().as_dict()
    finally:
        store.close()
    prefix = {
        **read_stats(settings.prefix_dir),
        "disk_limit": settings.prefix_disk_bytes,
        "directory": str(settings.prefix_dir),
    }
    if as_json:
        typer.echo(json.dumps({**figures, "prefix": prefix}))
        return
    console = Console()
    console.print(
        _table(
            "mlxc response cache",
            [
                ("hits", figures["hits"]),
                ("misses", figures["misses"]),
                ("total requests", figures["total_requests"]),
                ("hit rate", f"{figures['hit_rate']:.1%}"),
                ("cached items", figures["cached_items"]),
                ("size", f"{_human(figures['size_bytes'])} of {_human(figures['size_limit'])}"),
                ("eviction", figures["eviction_policy"]),
                ("where", f"{figures['backend']}: {figures['directory']}"),
            ],
        )
    )
    console.print(
        _table(
            "mlxc prefix (KV) cache",
            [
                ("hits", f"{prefix['hits']} ({prefix['memory_hits']} memory, "
                 f"{prefix['disk_hits']} disk)"),
                ("misses", prefix["misses"]),
                ("tokens reused", f"{prefix['tokens_reused']} "
                 f"({prefix['memory_tokens_reused']} memory, "
                 f"{prefix['disk_tokens_reused']} disk)"),
                ("prefill saved", f"{prefix['prefill_saved_fraction']:.1%} of prompt tokens"),
                ("disk blocks", f"{prefix['disk_blocks']} "
                 f"({prefix['shared_blocks']} where conversations branch)"),
                ("disk states", prefix["disk_entries"] - prefix["disk_blocks"]),
                ("disk size",
                 f"{_human(prefix['disk_bytes'])} of {_human(prefix['disk_limit'])}"),
                ("bytes written", f"{_human(prefix['bytes_written'])} "
                 f"({prefix['writes_skipped']} writes skipped, queue full)"),
                ("damaged blocks",
                 f"{prefix['blocks_damaged']} (failed their checks when read; dropped)"),
                ("where", prefix["directory"]),
            ],
        )
    )


def _table(title: str, rows: list[tuple[str, object]]) -> Table:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    for name, value in rows:
        table.add_row(name, str(value))
    return table


@app.command(
    epilog="[bold]Examples[/bold]\n\n  mlxc cache clear\n\n  mlxc cache clear --yes"
    "\n\n  mlxc cache clear --prefix-only -y"
)
def clear(
    cache_dir: CacheDirOption = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask first.")] = False,
    responses_only: Annotated[
        bool, typer.Option("--responses-only", help="Keep the prefix (KV) cache.")
    ] = False,
    prefix_only: Annotated[
        bool, typer.Option("--prefix-only", help="Keep the cached answers.")
    ] = False,
) -> None:
    """Delete every cached answer and saved prefix (KV) state, and reset the statistics.
    Models are kept. A running server keeps the states it holds in memory."""
    from mlxc.engine.kv.index import PrefixIndex
    from mlxc.errors import InputError

    if responses_only and prefix_only:
        raise InputError("--responses-only and --prefix-only exclude each other")
    settings = settings_from(cache_dir)
    places = [] if prefix_only else [f"all cached answers in {_response_place(settings)}"]
    if not responses_only:
        places.append(f"all prefix states in {settings.prefix_dir}")
    if not yes and not typer.confirm(f"Delete {' and '.join(places)}?"):
        raise typer.Exit(1)
    if not prefix_only:
        _clear_responses(settings)
        _clear_stored_conversations(settings)
    if not responses_only:
        index = PrefixIndex(settings.prefix_dir)
        try:
            typer.echo(f"removed {index.clear()} prefix states from {settings.prefix_dir}")
        finally:
            index.close()


def _response_place(settings) -> str:
    return settings.redis_url or str(settings.response_dir)


def _clear_stored_conversations(settings) -> None:
    """Responses API turns kept for `previous_response_id` are cached answers too."""
    from mlxc.server.conversations import Conversations

    stored = Conversations(settings.cache_dir / "conversations")
    try:
        if removed := stored.clear():
            typer.echo(f"removed {removed} stored responses (previous_response_id)")
    finally:
        stored.close()


def _clear_responses(settings) -> None:
    """Empty the response store; one SQLite cannot read is removed instead, so that clearing
    always works (the fix that a damaged store's error message names), and so is one on a
    full disk (SQLite needs space to delete rows; removing the files frees it)."""
    from mlxc.store import DiskStore, StoreDamaged, StoreError, StoreUnavailable, open_store

    try:
        store = open_store(settings)
    except (StoreDamaged, StoreUnavailable) as exc:
        broken: StoreError | None = exc
    else:
        try:
            typer.echo(f"removed {store.clear()} cached answers from {_response_place(settings)}")
            return
        except (StoreDamaged, StoreUnavailable) as exc:
            broken = exc
        finally:
            store.close()
    if settings.redis_url:  # Redis away: nothing on this disk to remove
        raise broken
    DiskStore.destroy(settings.response_dir)
    what = "damaged response cache" if isinstance(broken, StoreDamaged) else (
        "response cache on a full disk")
    typer.echo(f"removed the {what} in {settings.response_dir} (SQLite: {broken.__cause__})")


WARM_EXAMPLES = """
[bold]Examples[/bold]

  mlxc cache warm prompts.jsonl      # a line: {"prompt": "What is MLX?", "max_tokens": 64}

  cat prompts.jsonl | mlxc cache warm - --strict

  mlxc cache warm prompts.jsonl --url http://127.0.0.1:8081  # through mlxc serve

  mlxc cache warm system-prompts.jsonl --prefix-only   # prefill only, no answers

[bold]Lines[/bold] take the fields of `mlxc ask` and of a chat completion:
prompt (with system) or messages; model, max_tokens, temperature, top_p, seed, stop, tools, …
A warmed line has the cache key `mlxc ask` or the server would give the same request.
"""


@app.command(epilog=WARM_EXAMPLES)
def warm(
    file: Annotated[
        str, typer.Argument(help="JSONL file, one request per line; - reads stdin.",
                            metavar="FILE.jsonl", show_default=False)
    ],
    url: UrlOption = None,
    api_key: ApiKeyOption = None,
    strict: Annotated[
        bool, typer.Option("--strict", help="Stop at the first bad or failed line.")
    ] = False,
    prefix_only: Annotated[
        bool,
        typer.Option("--prefix-only", help="Prefill the prompts into the prefix (KV) cache; "
                     "generate and store no answers."),
    ] = False,
    model: ModelOption = None,
    cache_dir: CacheDirOption = None,
    cache_policy: CachePolicyOption = None,
    dtype: DtypeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Fill the response cache from a JSONL file, with a progress bar.

    Lines already cached are skipped: an interrupted warm-up resumes where it stopped.
    Ctrl-C keeps every answer finished so far.
    A bad line is reported with its number and skipped; the exit code is then 1."""
    from mlxc.cli.warming import run

    settings = settings_from(cache_dir, cache_policy, dtype, model)
    run(file, settings, model, url, api_key, strict, prefix_only, as_json)


from mlxc.cli.cache_live import MISSES_EXAMPLES, misses  # noqa: E402 - light: typer and rich

app.command(epilog=MISSES_EXAMPLES)(misses)

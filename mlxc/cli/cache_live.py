"""`mlxc cache misses` (why recent prompts missed the prefix cache, from a running server) and
`mlxc cache stats --watch` (the caches' figures, refreshed every second, from the local folder
or a server's /health). Reads only: no MLX, no model."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mlxc.cli.options import ApiKeyOption, JsonOption

DEFAULT_URL = "http://127.0.0.1:8081"
MISSES_EXAMPLES = (
    "[bold]Examples[/bold]\n\n  mlxc cache misses\n\n"
    "  mlxc cache misses --url http://127.0.0.1:8081 --last 5\n\n"
    "  mlxc cache misses --json | jq '.data[-1].diverged'"
)


def _get(url: str, path: str, api_key: str | None) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(url.rstrip("/") + path, headers=headers, timeout=5)
    except httpx.HTTPError as exc:
        raise typer.BadParameter(f"cannot reach {url} ({exc}); is `mlxc serve` running?",
                                 param_hint="--url") from None
    if response.status_code == 401:
        raise typer.BadParameter("the server wants an API key (--api-key or MLXC_API_KEY)",
                                 param_hint="--api-key")
    if response.status_code != 200:
        raise typer.BadParameter(f"{url}{path} answered {response.status_code}",
                                 param_hint="--url")
    return response.json()


def _diverged(row: dict[str, Any]) -> str:
    d = row.get("diverged")
    if not d:
        return "none — full reuse" if row.get("full_reuse") else "nothing stored"
    return d["label"] + (f" ({d['role']})" if d.get("role") else "")


def _excerpt(row: dict[str, Any]) -> str:
    from rich.markup import escape

    shown = (row.get("diverged") or {}).get("excerpt")
    if not shown:
        return ""
    return (f"…{escape(shown['before'])}[yellow]{escape(shown['old'])}[/yellow] → "
            f"[green]{escape(shown['new'])}[/green]")


def misses(
    url: Annotated[str, typer.Option(help="A running `mlxc serve`.")] = DEFAULT_URL,
    api_key: ApiKeyOption = None,
    last: Annotated[int, typer.Option(help="Show this many, newest last.")] = 20,
    as_json: JsonOption = False,
) -> None:
    """Why recent prompts missed the prefix cache, as a running server saw them.

    For each of the last generations (the server keeps 100, in memory): prompt tokens reused
    and from which tier, and where the prompt parted from the stored prefix (message, role,
    character) with the old and new text around it."""
    body = _get(url, "/v1/cache/misses", api_key)
    rows = body.get("data", [])[-last:] if last > 0 else []
    if as_json:
        typer.echo(json.dumps({**body, "data": rows}, ensure_ascii=False))
        return
    table = Table(title=f"prefix reuse, last {len(rows)} of {body.get('total', 0)} generations")
    for name in ("time", "route", "reused", "tier", "diverged", "old → new"):
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(time.strftime("%H:%M:%S", time.localtime(row["time"])), row["route"],
                      f"{row['reused_tokens']}/{row['prompt_tokens']}", row["tier"],
                      _diverged(row), _excerpt(row))
    Console().print(table)


# -- stats --watch ---------------------------------------------------------------------------


def _pct(value: Any) -> str:
    return value if isinstance(value, str) else f"{float(value or 0):.1%}"


def _figures_table(cache: dict[str, Any], prefix: dict[str, Any], extra: dict[str, Any]) -> Table:
    from mlxc.cli.cache import _human

    table = Table(title=f"mlxc caches — {time.strftime('%H:%M:%S')}", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("response hits / misses", f"{cache.get('hits', 0)} / {cache.get('misses', 0)}"),
        ("response hit rate", _pct(cache.get("hit_rate", 0))),
        ("hits/s", f"{extra.get('hits_per_second', 0.0):.1f}"),
        ("prefix hits / misses", f"{prefix.get('hits', 0)} / {prefix.get('misses', 0)}"),
        ("prefix tokens reused", f"{prefix.get('tokens_reused', 0)} "
         f"({prefix.get('memory_tokens_reused', 0)} memory, "
         f"{prefix.get('disk_tokens_reused', 0)} disk)"),
        ("prefill saved", _pct(prefix.get("prefill_saved_fraction", 0))),
        ("prefix memory", f"{_human(prefix.get('memory_bytes', 0))} of "
         f"{_human(prefix.get('memory_limit', 0) or 0)}"),
        ("prefix disk", f"{_human(prefix.get('disk_bytes', 0))} of "
         f"{_human(prefix.get('disk_limit', 0) or 0)}"),
    ]
    if "running" in extra:
        rows += [("running / waiting", f"{extra['running']} / {extra['waiting']}"),
                 ("decode tokens/s", f"{extra['tokens_per_second']:.1f}")]
    for name, value in rows:
        table.add_row(name, str(value))
    return table


def local_figures(settings: Any) -> Callable[[], tuple[dict, dict, dict]]:
    """Figures from the cache folder (the store and the prefix index), as `cache stats`."""
    from mlxc.engine.kv.index import read_stats
    from mlxc.store import open_store

    def read() -> tuple[dict, dict, dict]:
        store = open_store(settings)
        try:
            cache = store.stats().as_dict()
        finally:
            store.close()
        prefix = {**read_stats(settings.prefix_dir), "disk_limit": settings.prefix_disk_bytes}
        return cache, prefix, {}

    return read


def remote_figures(url: str, api_key: str | None) -> Callable[[], tuple[dict, dict, dict]]:
    """Figures from a running server's /health."""

    def read() -> tuple[dict, dict, dict]:
        health = _get(url, "/health", api_key)
        if "cache" not in health:
            raise typer.BadParameter("the server wants an API key", param_hint="--api-key")
        batch = health.get("batch") or {}
        extra = {"running": batch.get("running", 0), "waiting": batch.get("waiting", 0),
                 "tokens_per_second": float(batch.get("tokens_per_second", 0.0) or 0.0)}
        return health.get("cache") or {}, health.get("prefix_cache") or {}, extra

    return read


def watch_stats(read: Callable[[], tuple[dict, dict, dict]], every: float = 1.0,
                times: int | None = None, console: Console | None = None) -> None:
    """Redraw the figures every `every` seconds until Ctrl-C (or `times` redraws)."""
    from rich.live import Live

    last: tuple[float, int] | None = None
    done = 0
    with Live(console=console or Console(), auto_refresh=False) as live:
        try:
            while times is None or done < times:
                cache, prefix, extra = read()
                now, hits = time.monotonic(), int(cache.get("hits", 0) or 0)
                if last is not None:
                    extra["hits_per_second"] = max(0, hits - last[1]) / max(now - last[0], 1e-9)
                last = (now, hits)
                live.update(_figures_table(cache, prefix, extra), refresh=True)
                done += 1
                if times is None or done < times:
                    time.sleep(every)
        except KeyboardInterrupt:
            pass

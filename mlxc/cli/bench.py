"""`mlxc bench`: hit vs miss latency, TTFT, tokens/s and follow-up speedup, in-process or
against any OpenAI-compatible server. Thin: mlxc.bench runs, mlxc.bench_report reports."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from mlxc.cli.options import (
    ApiKeyOption,
    DtypeOption,
    ModelOption,
    settings_from,
)

EXAMPLES = """
[bold]Examples[/bold]

  mlxc bench                                   # in-process, on a throwaway cache folder

  mlxc bench -n 8 --max-tokens 128 --json bench.json --plot bench.png

  mlxc bench --url http://127.0.0.1:8081       # a running mlxc serve

  mlxc bench --url http://127.0.0.1:8080 --model my-model   # e.g. mlx_lm.server

  mlxc bench --url :8081 --url :8082 -c 1,4    # two replicas, round-robin by conversation

  mlxc bench --prompts prompts.jsonl -c 8      # your prompts, 8 clients at once

  mlxc bench -c 1,2,4,8 -n 8 --no-reference    # batching: tokens/s, TTFT and ITL per level
"""


def _writable(path: Path | None, flag: str) -> None:
    from mlxc.errors import InputError

    if path is not None and not path.parent.expanduser().resolve().is_dir():
        raise InputError(f"{flag} {path}: folder {path.parent} does not exist")


def bench(
    requests: Annotated[
        int, typer.Option("--requests", "-n", min=1, help="Requests per scenario.")
    ] = 4,
    max_tokens: Annotated[int, typer.Option(min=1, help="Most tokens per answer.")] = 64,
    concurrency: Annotated[
        str, typer.Option("--concurrency", "-c",
                          help="Clients at once in the last scenario; a list (1,2,4,8) runs "
                          "one scenario per level and reports aggregate tokens/s of each.")
    ] = "4",
    prompts: Annotated[
        Path | None,
        typer.Option(help="JSONL requests to use (as for `mlxc cache warm`) instead of the "
                     "built-in prompts.", show_default=False),
    ] = None,
    urls: Annotated[
        list[str] | None,
        typer.Option("--url", help="A running `mlxc serve` (or other OpenAI-compatible "
                     "server), e.g. http://127.0.0.1:8081; the model is not loaded here. "
                     "Repeat it to measure replicas together: conversations go round-robin, "
                     "each staying on one server; every request carries X-Session-Id for a "
                     "balancer.", show_default=False),
    ] = None,
    api_key: ApiKeyOption = None,
    model: ModelOption = None,
    json_file: Annotated[
        Path | None, typer.Option("--json", help="Write every figure and sample here.",
                                  show_default=False)
    ] = None,
    plot_file: Annotated[
        Path | None, typer.Option("--plot", help="Draw latency distributions to this PNG.",
                                  show_default=False)
    ] = None,
    no_reference: Annotated[
        bool, typer.Option("--no-reference", help="Skip the run without a prefix cache "
                           "(in-process: the follow-up speedup and its identity check).")
    ] = False,
    cache_dir: Annotated[
        Path | None,
        typer.Option(help="Cache folder to bench on (default: a temporary one, so a bench "
                     "never touches your cache)", show_default=False),
    ] = None,
    dtype: DtypeOption = None,
) -> None:
    """Measure what the caches buy: misses, hits, follow-up turns and concurrent clients.

    Reports TTFT, ITL, TPOT and end-to-end latency (mean, median, p95, p99) and tokens/s.
    Says how much faster a hit is than a miss, and a follow-up with the prefix cache.
    Checks that cached and prefix-reused greedy answers equal the uncached ones."""
    import dataclasses

    from rich.console import Console

    from mlxc import bench as core
    from mlxc import bench_report as report
    from mlxc.cli.bench_view import BenchDisplay, load_prompts, meta_for

    levels = _levels(concurrency)
    url = ", ".join(urls) if urls else None
    _writable(json_file, "--json")
    _writable(plot_file, "--plot")
    if plot_file is not None:
        _need_matplotlib()
    base = load_prompts(prompts) if prompts is not None else None
    settings = settings_from(cache_dir, None, dtype, model)
    console = Console(stderr=True, highlight=False)
    with tempfile.TemporaryDirectory(prefix="mlxc-bench-") as scratch:
        if cache_dir is None and not url:  # throwaway caches; Redis is not used either
            settings = dataclasses.replace(settings, cache_dir=Path(scratch), redis_url=None)
        tagged = bool(url or cache_dir)  # a cache that outlives this run may hold our prompts
        plan = core.default_plan(requests, levels, max_tokens, tagged)
        if base is not None:
            plan.requests = base
        display = BenchDisplay(console)
        client = None
        try:
            with display:
                if urls and len(urls) > 1:
                    from mlxc.bench_servers import ServersBenchClient

                    client = ServersBenchClient(urls, api_key, model)
                elif url:
                    client = core.RemoteBenchClient(url, api_key, model)
                else:
                    client = core.LocalClient(settings, progress=display.status)
                reference = None
                if not url and not no_reference:
                    def reference() -> core.LocalClient:
                        return core.LocalClient(core.prefixless(settings), display.status)
                result = core.run(client, plan, display, reference)
                meta = meta_for(client, url, plan)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None
        finally:
            if client is not None:
                client.close()
    if not meta["greedy"]:
        result.identical.clear()  # sampled answers may differ by design
    summary = report.summarize(result)
    title = f"mlxc bench · {meta['model']} · {meta['target']} · max_tokens {max_tokens}"
    Console().print(report.table(summary, title))
    if urls and len(urls) > 1:
        console.print(report.servers_line(result))
    if json_file is not None:
        json_file.write_text(json.dumps(report.as_json(meta, result), indent=2) + "\n")
        console.print(f"wrote {json_file}")
    if plot_file is not None:
        report.plot(result, plot_file, title)
        console.print(f"wrote {plot_file}")


def _levels(text: str) -> list[int]:
    from mlxc.errors import InputError

    try:
        levels = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        levels = []
    if not levels or min(levels) < 1:
        raise InputError(f"--concurrency {text!r}: give client counts, e.g. 4 or 1,2,4,8")
    return list(dict.fromkeys(levels))


def _need_matplotlib() -> None:
    import importlib.util

    from mlxc.errors import InputError

    if importlib.util.find_spec("matplotlib") is None:
        raise InputError("--plot needs matplotlib: pip install 'mlxc[plot]'")

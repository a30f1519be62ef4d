"""What `mlxc cache warm` shows: a live Rich progress bar (done/total, already cached, failed,
tokens/s, ETA) on stderr while the engine generates in its thread, bad lines as they are
found, and a summary table (or JSON) at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn
from rich.table import Table

from mlxc.warm import Summary, load, warm
from mlxc.warm_targets import LocalTarget, RemoteTarget


class WarmDisplay:
    """The mlxc.warm.Listener for a terminal; silent (but for bad lines) when not one."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            console=console,
            disable=not console.is_terminal,
        )
        self.task = self.progress.add_task("reading", total=None, detail="")
        self.cached = self.bad = self.ran = self.to_run = 0
        self.tokens = self.live_tokens = 0
        self.run_seconds = 0.0
        self.line_started: float | None = None

    def __enter__(self) -> WarmDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def status(self, message: str) -> None:
        """Model fetch/load messages; safe from the engine thread (Progress locks)."""
        self.progress.update(self.task, description=message)

    def planned(self, lines: int, cached: int, to_run: int) -> None:
        self.cached, self.to_run = cached, to_run
        self.progress.update(self.task, total=lines, completed=cached + self.bad,
                             description="warming")
        self._detail()

    def failed(self, number: int, reason: str) -> None:
        self.bad += 1
        self.console.print(f"[red]line {number}[/red]: {reason}", highlight=False)
        self.line_started = None
        self.progress.advance(self.task)
        self._detail()

    def text(self, piece: str) -> None:
        if self.line_started is None:
            self.line_started = time.perf_counter()
            self.progress.update(self.task, description="warming")  # the model is loaded
        self.live_tokens += 1  # about one piece per token; corrected when the line ends
        self._detail()

    def done(self, status: str, tokens: int, seconds: float) -> None:
        if status == "hit":
            self.cached += 1
        else:
            self.tokens += tokens
            self.run_seconds += seconds
        self.ran += 1
        self.live_tokens, self.line_started = 0, None
        self.progress.advance(self.task)
        self._detail()

    def _detail(self) -> None:
        live = time.perf_counter() - self.line_started if self.line_started else 0.0
        seconds = self.run_seconds + live
        rate = (self.tokens + self.live_tokens) / seconds if seconds > 0 else 0.0
        left = self.to_run - self.ran
        eta = "-:--"
        if self.ran and self.run_seconds:
            eta = _clock(max(0.0, self.run_seconds / self.ran * left - live))
        self.progress.update(
            self.task,
            detail=f"{self.cached} cached · {self.bad} failed · {rate:.1f} tok/s · ETA {eta}",
        )


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds + 0.5), 60)
    if minutes >= 60:
        return f"{minutes // 60}:{minutes % 60:02d}:{secs:02d}"
    return f"{minutes}:{secs:02d}"


def summary_table(summary: Summary, source: str) -> Table:
    table = Table(title=f"mlxc cache warm · {source}", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("lines", str(summary.lines))
    table.add_row("warmed", str(summary.warmed))
    table.add_row("already cached", str(summary.cached))
    table.add_row("failed", f"[red]{summary.failed}[/red]" if summary.failed else "0")
    table.add_row("tokens generated", str(summary.tokens))
    table.add_row("time", f"{summary.seconds:.1f} s")
    table.add_row("tokens/s", f"{summary.tokens_per_second:.1f}")
    if summary.interrupted:
        table.add_row("stopped", "[yellow]interrupted: finished answers are kept[/yellow]")
    return table


def run(
    source: str,
    settings,
    model: str | None,
    url: str | None,
    api_key: str | None,
    strict: bool,
    prefix_only: bool,
    as_json: bool,
) -> None:
    """Read, warm, report; exit 1 if any line failed, 130 if interrupted."""
    from mlxc.errors import InputError

    if url and prefix_only:
        raise InputError("--prefix-only warms this process's prefix cache: leave out --url")
    lines = load(source)  # a missing or empty file fails here, before anything is opened
    if url and model:
        for line in lines:  # --model names the served model for lines that name none
            line.model = line.model or model
    console = Console(stderr=True, highlight=False)
    display = WarmDisplay(console)
    target = None
    try:
        with display:
            target = (
                RemoteTarget(url, api_key)
                if url
                else LocalTarget(settings, prefix_only, progress=display.status)
            )
            summary = warm(lines, target, display, strict=strict)
    except KeyboardInterrupt:  # while the model loaded: nothing to keep
        raise typer.Exit(130) from None
    finally:
        if target is not None:
            target.close()
    name = "stdin" if source == "-" else Path(source).name
    if as_json:
        typer.echo(json.dumps(summary.as_dict()))
    else:
        Console().print(summary_table(summary, name))
    if summary.interrupted:
        raise typer.Exit(130)
    if summary.failed:
        raise typer.Exit(1)


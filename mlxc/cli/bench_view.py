"""What `mlxc bench` shows while it runs (one progress line per scenario, on stderr), the
requests it reads from --prompts, and the facts a report opens with."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from mlxc.bench import Plan, Sample, machine
from mlxc.request import GenerationRequest


class BenchDisplay:
    """The mlxc.bench.Listener for a terminal; samples may come from several threads."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("[bold]{task.description:<11}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[last]}"),
            TimeElapsedColumn(),
            console=console,
            disable=not console.is_terminal,
        )
        self.task: TaskID = self.progress.add_task("starting", total=None, last="")
        self._lock = threading.Lock()
        self._loading = True

    def __enter__(self) -> BenchDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def status(self, message: str) -> None:
        """Model loading messages (engine thread): the first load has a line of its own."""
        field = "description" if self._loading else "last"
        self.progress.update(self.task, **{field: message})

    def scenario(self, name: str, requests: int) -> None:
        with self._lock:
            if self._loading:  # the "loading the model" line gives way to the first scenario
                self.progress.remove_task(self.task)
                self._loading = False
            else:
                self.progress.stop_task(self.task)
            self.task = self.progress.add_task(name, total=requests, last="")

    def sample(self, sample: Sample) -> None:
        with self._lock:
            last = f"{sample.status} · TTFT {sample.ttft * 1000:.0f} ms · {sample.e2e:.2f} s"
            self.progress.update(self.task, advance=1, last=last)


def load_prompts(path: Path) -> list[GenerationRequest]:
    """--prompts: the lines `mlxc cache warm` takes; any bad line stops the bench."""
    from mlxc.errors import InputError
    from mlxc.warm import load

    requests = []
    for line in load(str(path)):
        if line.error is not None:
            raise InputError(f"{path} line {line.number}: {line.error}")
        if line.model is not None:
            raise InputError(f"{path} line {line.number}: a bench runs one model; use --model")
        requests.append(line.request)
    return requests


def meta_for(client: Any, url: str | None, plan: Plan) -> dict[str, Any]:
    from mlxc import __version__

    service = getattr(client, "service", None)
    engine = service.engine() if service is not None and service.engine_started else None
    return {
        "mlxc": __version__,
        "target": url or "in-process",
        "model": Path(client.name).name if client.name.startswith(("/", ".", "~")) else client.name,
        "dtype": getattr(engine, "dtype", None),
        "requests": plan.count,
        "concurrency": plan.concurrency,
        "max_tokens": plan.max_tokens,
        "greedy": all(r.temperature == 0 for r in plan.requests),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
    }

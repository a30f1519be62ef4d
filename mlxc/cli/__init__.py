"""The `mlxc` command line: thin commands over mlxc.service, rendered with Rich."""

from __future__ import annotations

import os
import sys

# Pydantic scans every installed distribution for plugins on first use (~25 ms): too much
# for a cache hit that should take a blink. mlxc's command line uses no pydantic plugin.
os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")

import typer  # noqa: E402

from mlxc import __version__  # noqa: E402
from mlxc.cli import ask, bench, cache, help_format, serve

help_format.install()

app = typer.Typer(
    name="mlxc",
    help="Run local language models with MLX from the shell and behind an OpenAI/Anthropic "
    "API, with response and prefix caches that survive restarts.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("ask", epilog=ask.EXAMPLES)(ask.ask)
app.command("serve", epilog=serve.EXAMPLES)(serve.serve)
app.command("bench", epilog=bench.EXAMPLES)(bench.bench)
app.add_typer(cache.app, name="cache")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"mlxc {__version__}")
        typer.echo(_backend_lines())
        raise typer.Exit()


def _backend_lines() -> str:
    """Which backend and device generation runs on; the BLAS only where MLX's CPU backend
    runs (on a GPU the matmuls never reach it)."""
    from mlxc.model.dtype import gpu_backend

    lines = []
    gpu = gpu_backend()
    if not gpu:
        from mlxc.model.blas import load_optimised_blas

        blas = load_optimised_blas()  # what a generating command would load: before MLX
        where = f", {blas.path}" if blas.path else (f": {blas.note}" if blas.note else "")
        lines.append(f"BLAS: {blas.name} ({blas.source}{where})")
    try:
        import mlx.core as mx
    except ImportError as exc:
        return "\n".join([f"backend: none (MLX cannot be loaded: {exc})", *lines])
    device = mx.default_device()
    kind = "cpu" if device.type == mx.cpu else "metal" if mx.metal.is_available() else "cuda"
    name = mx.device_info().get("device_name", "?")
    return "\n".join([f"backend: MLX {mx.__version__} {kind} · device: {name}", *lines])


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show version, backend, device."
    ),
) -> None:
    pass


def main() -> None:
    """Entry point: known errors become one line on stderr and exit code 1, not a traceback."""
    from mlxc.errors import USER_ERRORS, describe

    try:
        app()
    except USER_ERRORS as exc:
        typer.echo(f"mlxc: error: {describe(exc)}", err=True)
        sys.exit(1)

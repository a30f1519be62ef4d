"""The Typer app: every command and its help. `mlxc ask`'s common forms skip it on the way
to a cache hit (cli/__init__.py): building it costs more than the rest of a hit."""

from __future__ import annotations

import typer

from mlxc import __version__
from mlxc.cli import ask, bench, cache, help_format, models, serve

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
app.add_typer(models.app, name="models")


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

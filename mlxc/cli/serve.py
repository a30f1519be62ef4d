"""`mlxc serve`: the OpenAI- and Anthropic-compatible server, on the shared response cache."""

from __future__ import annotations

import logging
import socket
import time
from typing import Annotated

import typer

from mlxc.cli.options import (
    CacheDirOption,
    CachePolicyOption,
    DraftModelOption,
    DtypeOption,
    SpeculateOption,
    settings_from,
)
from mlxc.cli.serve_distributed import PARALLEL_HELP
from mlxc.engine.batch.limits import DEFAULT_MAX_QUEUE  # no MLX at import

EXAMPLES = """
[bold]Examples[/bold]

  mlxc serve                                    # http://127.0.0.1:8081, the default model

  mlxc serve --port 9000 --api-key "$KEY" -m ./my-mlx-model

  mlxc serve -m main=./Qwen3-Coder-30B -m small=./SmolLM2 --alias 'claude-haiku*=small' \\
             --alias 'claude-*'          # two models, loaded on first use, by `model`

  OPENAI_BASE_URL=http://127.0.0.1:8081/v1 OPENAI_API_KEY=none  my-openai-tool

  ANTHROPIC_BASE_URL=http://127.0.0.1:8081 ANTHROPIC_MODEL=smollm2-135m-instruct claude

  curl -s localhost:8081/health | jq .cache.hit_rate

  mlxc serve --shards 2 -m ./Qwen2.5-0.5B --parallel pipeline   # one model over 2 processes

  mlxc serve -m ./Qwen2.5-7B --draft-model ./Qwen2.5-0.5B        # a draft model drafts

  mlx.launch --hostfile hosts.json --backend ring -- mlxc serve --distributed -m ./model
"""


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _listen(host: str, port: int) -> socket.socket:
    """The server's socket, bound now so that a taken port is one clear error."""
    from mlxc.errors import InputError

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as exc:
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def _connection_cap(wanted: int) -> int:
    """At most `wanted`, and enough below the file-descriptor limit for the model's files,
    the cache databases and the log."""
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, ValueError, OSError):
        return wanted
    return max(1, min(wanted, soft - 64)) if soft > 0 else wanted


def serve(
    host: Annotated[str, typer.Option(help="Address to bind; loopback by default.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8081,
    model: Annotated[
        list[str] | None,
        typer.Option(
            "--model", "-m",
            help="Model to serve: MLX folder, .gguf file or Hugging Face repo id; repeatable "
            "(NAME=PATH names one; the first is the default, the others load on first use) "
            "\\[env: MLXC_MODEL] \\[default: SmolLM2-135M-Instruct]",
            show_default=False,
        ),
    ] = None,
    max_models: Annotated[
        int, typer.Option(help="Models loaded at once; past it, or past the memory, the least "
                          "recently used idle one is unloaded.")
    ] = 3,
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="MLXC_API_KEY",
            help="Require this key (Authorization: Bearer or x-api-key) on /v1 routes "
            "[env: MLXC_API_KEY]",
            show_default=False,
        ),
    ] = None,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="For requests that leave it out.")
    ] = 0.0,
    alias: Annotated[
        list[str] | None,
        typer.Option(help="Another model name to answer to (repeatable, globs allowed, "
                     "tried in order), e.g. 'claude-*' for Claude Code; NAME=MODEL for a "
                     "model other than the default, e.g. 'claude-haiku*=small'."),
    ] = None,
    keepalive: Annotated[
        float, typer.Option(help="Seconds of silence before a stream sends a keep-alive.")
    ] = 10.0,
    max_body: Annotated[str, typer.Option(help="Largest request body accepted.")] = "4MB",
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option("--allowed-hosts", help="Another Host name to answer to (repeatable; "
                     "'*' for any), e.g. a LAN name. Loopback names and --host always work."),
    ] = None,
    cors: Annotated[
        list[str] | None,
        typer.Option(help="Allow browser pages from this origin (repeatable; '*' for any), "
                     "e.g. http://localhost:3000. Off by default: web pages are refused."),
    ] = None,
    request_timeout: Annotated[
        float, typer.Option(help="Seconds a client has to send a request's head, and then "
                            "its body; a slower one gets 408 and is closed.")
    ] = 30.0,
    max_connections: Annotated[
        int, typer.Option(help="Open connections at most; past it the oldest idle one is "
                          "closed, or the new one refused with 503.")
    ] = 512,
    max_batch: Annotated[
        int | None, typer.Option(help="Sequences decoded together (default: 8; 4 for a "
                                 "model kept quantized on CUDA); 1 gives exactly mlx-lm's "
                                 "lone answers.",
                                 show_default=False)
    ] = None,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait for a place in the batch; past that, "
                          "503 with Retry-After.")
    ] = DEFAULT_MAX_QUEUE,
    max_kv_memory: Annotated[
        str, typer.Option(envvar="MLXC_MAX_KV_MEMORY",
                          help="Memory for the KV caches of running requests, e.g. 8GB; a "
                          "request that would pass it waits, one that never fits gets a 400. "
                          "'auto': the device's memory less the weights and a margin of 5% (at "
                          "least 512 MB); 'off': not checked [env: MLXC_MAX_KV_MEMORY]")
    ] = "auto",
    speculate: SpeculateOption = None,
    draft_model: DraftModelOption = None,
    shutdown_timeout: Annotated[
        float, typer.Option(envvar="MLXC_SHUTDOWN_TIMEOUT",
                            help="On SIGTERM or Ctrl-C: seconds the requests in flight have to "
                            "finish before they are cancelled; then the prefix cache's last "
                            "blocks and counters are written (SIGTERM exits 0) "
                            "[env: MLXC_SHUTDOWN_TIMEOUT]")
    ] = 10.0,
    miss_excerpts: Annotated[
        bool, typer.Option("--miss-excerpts/--no-miss-excerpts", envvar="MLXC_MISS_EXCERPTS",
                           help="Keep ~60 characters of old and new text around where a prompt "
                           "parted from the stored prefix, in memory only, for "
                           "/v1/cache/misses and the dashboard [env: MLXC_MISS_EXCERPTS]")
    ] = True,
    distributed: Annotated[
        bool, typer.Option("--distributed", help="Be one rank of a model split over the "
                           "processes mlx.launch started: rank 0 serves, the others follow.")
    ] = False,
    shards: Annotated[
        int | None, typer.Option(help="Split the model over N processes on this host (MLX's "
                                 "ring backend on loopback), started and stopped here.",
                                 show_default=False)
    ] = None,
    parallel: Annotated[str, typer.Option(help=PARALLEL_HELP)] = "auto",
    cache_dir: CacheDirOption = None,
    cache_policy: CachePolicyOption = None,
    dtype: DtypeOption = None,
) -> None:
    """Serve the model over OpenAI's and Anthropic's HTTP APIs.

    Routes: /v1/chat/completions, /v1/completions, /v1/responses, /v1/messages,
    /v1/messages/count_tokens, /v1/models, /health, /metrics.

    Answers share the cache with `mlxc ask`; responses carry X-Mlxc-Cache: hit|miss|bypass
    (bypass also while the cache is unavailable, as on a full disk: /health says degraded)."""
    import uvicorn
    from rich.console import Console
    from rich.markup import escape
    from rich.panel import Panel
    from rich.table import Table

    from mlxc.config import parse_size
    from mlxc.errors import InputError
    from mlxc.server.app import create_app
    from mlxc.server.guard import GuardOptions, host_names
    from mlxc.server.limits import Throttle, ThrottledLog, guarded_protocol
    from mlxc.server.model_pool import ModelPool
    from mlxc.server.shutdown import serve_until_stopped
    from mlxc.server.state import ServerOptions
    from mlxc.store import StoreUnavailable

    if not 0.0 <= temperature <= 2.0:
        raise InputError("--temperature must be between 0 and 2")
    if keepalive <= 0:
        raise InputError("--keepalive must be a positive number of seconds")
    if request_timeout <= 0:
        raise InputError("--request-timeout must be a positive number of seconds")
    if shutdown_timeout < 0:
        raise InputError("--shutdown-timeout must be 0 or more seconds")
    if max_connections < 1:
        raise InputError("--max-connections must be at least 1")
    if (max_batch is not None and max_batch < 1) or max_queue < 0:
        raise InputError("--max-batch must be at least 1 and --max-queue at least 0")
    chosen = max_kv_memory.strip().lower()
    kv_limit = {"auto": None, "off": 0}.get(chosen, None)
    if chosen not in ("auto", "off") and (kv_limit := parse_size(chosen)) <= 0:
        raise InputError("--max-kv-memory must be a size such as 8GB, auto or off")
    if shards is not None:  # this process only starts and watches the ranks
        import sys

        from mlxc.cli.serve_distributed import launch_shards

        raise typer.Exit(launch_shards(shards, sys.argv[1:], shutdown_timeout))
    # A server sits idle between a reply and the follow-up: a good time to prefill its opening.
    settings = settings_from(cache_dir, cache_policy, dtype).with_overrides(
        next_turn_prefill=True, speculate=speculate, draft_model=draft_model
    )
    role = None
    if distributed:  # ranks other than 0 follow rank 0 and exit inside become_rank
        from mlxc.cli import serve_distributed as sharded

        max_batch = sharded.check_options(max_batch, model, parallel)
        settings = sharded.sharded_settings(settings)
        role = sharded.become_rank(parallel, settings, (model or [None])[0])
    sock = _listen(host, port)  # before the model loads: a busy port fails at once
    console = Console(stderr=True, highlight=False)
    status = console.status("starting", spinner="dots")
    pool = ModelPool(  # one service per model, on one store (server/model_pool.py)
        settings, model or [settings.model], tuple(alias or ()), progress=status.update,
        engine_options={"max_batch": max_batch, "max_queue": max_queue,
                        "max_kv_memory": kv_limit},
        max_models=max_models,
    )
    service = pool.default.service  # loaded now; the others on their first request
    try:
        if console.is_terminal:
            status.start()
        try:
            engine = service.engine()  # fetch/convert once, then load on the engine thread
            if role is not None:  # a lost rank: its requests answered 503 at once, then exit
                sharded.watch_engine(role, engine)
            engine.wait_loaded()
            status.update("warming up (compiling kernels)")
            engine.call(lambda e: e.warm_up()).result()  # the first client does not pay it
            try:
                stats = service.store.stats()
            except StoreUnavailable:  # a full disk, Redis gone: serve uncached (degraded)
                stats = None
            _ = service.fingerprint  # hashed now, not on the first request
        finally:
            status.stop()

        from mlxc.server.request_lines import LoopLines

        # A file or a pipe: plain lines, never wrapped, one write per turn of the event loop.
        lines = None if console.is_terminal else LoopLines(console.file)

        def log(line: str) -> None:  # one line per request, on the event loop: kept cheap
            if lines is not None:
                lines(line)
            else:
                console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {escape(line)}")

        options = ServerOptions(
            api_key=api_key or None,
            temperature=temperature,
            keepalive=keepalive,
            max_body_bytes=parse_size(max_body),
            aliases=tuple(alias or ()),
            log=log,
            miss_excerpts=miss_excerpts,
        )
        from mlxc.server.misses import log_to

        log_to(log)  # each generation's prefix line (INFO), beside the request lines
        guard = GuardOptions(
            hosts=host_names(host, [h for v in allowed_hosts or () for h in v.split(",")]),
            cors=tuple(c for v in cors or () for c in v.split(",") if c.strip()),
            body_timeout=request_timeout,
            api_key=options.api_key,
        )
        app = create_app(pool, options, guard)
        url = f"http://{host if ':' not in host else f'[{host}]'}:{port}"
        table = Table.grid(padding=(0, 2))
        table.add_row("[bold]model[/bold]", f"{app.state.mlxc.model_id} ({engine.dtype})")
        for other in pool.models[1:]:
            table.add_row("", f"{other.name} (loads on first use)")
        table.add_row("[bold]URL[/bold]", f"{url}  (OpenAI: {url}/v1 · Anthropic: {url})")
        if stats is None:
            table.add_row("[bold]cache[/bold]", "[yellow]degraded[/yellow]: "
                          f"{escape(service.store.degraded.reason)}; answering uncached")
        else:
            table.add_row("[bold]cache[/bold]", f"{stats.directory}")
            table.add_row(
                "[bold]cache size[/bold]",
                f"{stats.cached_items} answers · {_human(stats.size_bytes)} of "
                f"{_human(stats.size_limit)} · policy {settings.cache_policy}",
            )
        table.add_row("[bold]API key[/bold]", "required" if api_key else "off")
        table.add_row("[bold]browsers[/bold]",
                      f"CORS for {', '.join(guard.cors)}" if guard.cors else "refused (--cors)")
        table.add_row(
            "[bold]batch[/bold]", f"up to {engine.max_batch} together, {max_queue} waiting"
        )
        table.add_row("[bold]memory[/bold]", engine.memory.describe())
        if role is not None:
            table.add_row("[bold]world[/bold]", sharded.describe(role))
        console.print(Panel(table, title="mlxc serve", title_align="left", expand=False))
        cap = _connection_cap(max_connections)
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_level="warning",
            access_log=False,  # RequestLog writes one line per request instead
            lifespan="off",
            timeout_graceful_shutdown=shutdown_timeout,  # then what is left is cancelled
            timeout_keep_alive=5,  # idle keep-alive connections are closed
            http=guarded_protocol(request_timeout, cap, Throttle(log)),
            # asyncio accepts up to `backlog` sockets before any protocol sees one: kept
            # small, a flood cannot push the open files past the cap by thousands.
            backlog=max(16, min(128, cap // 4)),
        )
        for name in ("uvicorn.error", "asyncio"):  # one line per cause and minute
            logging.getLogger(name).addFilter(ThrottledLog())
        serve_until_stopped(config, sock, log)  # SIGTERM returns too: the clean-up runs
        if lines is not None:
            lines.flush()  # what the loop's last turn left
    finally:
        sock.close()
        pool.close()
        if role is not None:
            sharded.stop_followers(role)

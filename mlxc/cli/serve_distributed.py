"""`mlxc serve --distributed` (one rank of a world that mlx.launch started) and `mlxc serve
--shards N` (N ranks on this host over MLX's ring backend on loopback, started and stopped
here). Rank 0 serves HTTP, the response cache and the scheduler; the others follow it
(distributed/serving.py). No MLX is imported here."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from mlxc.errors import InputError

PARALLEL_HELP = ("How a model is split over the ranks of --distributed/--shards: tensor "
                 "(every layer's heads; llama/qwen-family models), pipeline (layers; qwen2, "
                 "qwen3, deepseek, ...) or auto (tensor where the model has it).")
FOLLOWER_EXIT_WAIT = 10.0  # s a follower has to leave after rank 0 has
LOST_WAIT = 10.0  # s rank 0 has to answer its requests and exit when a follower dies
STOP_WAIT = 5.0  # s rank 0 waits for its stop to reach the followers


def check_options(max_batch: int | None, models: list[str] | None, parallel: str
                  ) -> int | None:
    """The batch size a sharded server runs (as asked: rank 0's batch is mirrored to every
    rank), or an InputError saying what is refused."""
    if parallel not in ("tensor", "pipeline", "auto"):
        raise InputError(f"--parallel must be tensor, pipeline or auto, not {parallel!r}")
    if models and len(models) > 1:
        raise InputError("--distributed/--shards serves one model: give a single --model")
    return max_batch


def sharded_settings(settings: Any) -> Any:
    """What a sharded engine can follow: no CUDA compiled/batched steps (they change a cache
    outside a model call, or run the model where the other ranks do not). Speculation by
    prompt lookup and predictions stays: its verify pass is a model call like any other and
    its cuts of the KV (trim, prepare/finalize) are mirrored with the batch's operations."""
    if getattr(settings, "draft_model", None) or settings.speculate == "draft":
        raise InputError("--draft-model cannot be used with --distributed/--shards yet: the "
                         "draft model's own calls and caches are not mirrored to the other "
                         "ranks; drop it (prompt lookup and predictions still speculate)")
    return settings.with_overrides(compiled_decode=False, batch_kernels=False,
                                   fused_projections=False)


def become_rank(parallel: str, settings: Any, model: str | None) -> Any:
    """Join the world. A rank other than 0 follows rank 0 and exits here; rank 0 gets its
    Role back, with the model prepared (fetched/converted once per host)."""
    from mlxc.distributed.serving import join_world, preparing, run_follower
    from mlxc.model.refs import prepare_model, resolve_model
    from mlxc.server.model_names import split_model_option

    role = join_world(parallel)
    ref = resolve_model(split_model_option(model or settings.model)[1], settings)
    if role.world.rank != 0:
        # A terminal's Ctrl-C reaches every rank: rank 0 finishes its requests, then stops
        # this one; a lost rank 0 ends it too (a failed collective).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            code = run_follower(ref, settings)
        except Exception as exc:  # said plainly; the launcher then ends the other ranks
            print(f"mlxc: rank {role.world.rank} failed: {exc}", file=sys.stderr, flush=True)
            if role.watch is not None:  # and to rank 0, for its message
                role.watch.say(f"it failed: {exc}")
            code = 1
        sys.stdout.flush()
        os._exit(code)  # MLX's thread teardown at exit can abort; nothing is left to write
    with preparing(ref.folder):
        prepare_model(ref, lambda msg: print(f"rank 0: {msg}", file=sys.stderr, flush=True))
    return role


def watch_engine(role: Any, engine: Any) -> None:
    """Rank 0: when a rank is lost, `engine`'s requests are answered 503 and the process
    exits, even while its engine thread waits in a collective for ever (distributed/watch.py)."""
    from mlxc.distributed.serving import serve_watched

    serve_watched(role, engine)


def describe(role: Any) -> str:
    """The banner's world line."""
    hosts = sorted(set(role.hosts))
    return (f"{role.world.size} ranks over {role.world.backend} · {role.layout} parallel · "
            f"{', '.join(hosts)}")


def stop_followers(role: Any) -> None:
    """Tell the followers to leave (after the engine has stopped), bounded: a dead peer must not
    hold the exit."""
    leader = role.leader
    if leader is None:
        return
    if role.watch is not None:  # the followers may leave now: no loss
        role.watch.goodbye()
    done = threading.Thread(target=leader.stop, daemon=True)
    done.start()
    done.join(STOP_WAIT)


# -- mlxc serve --shards N: the ranks started and watched here ---------------------------


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def rank_argv(argv: list[str]) -> list[str]:
    """mlxc serve's arguments for each rank: --shards N becomes --distributed."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--shards":
            skip = True
        elif not arg.startswith("--shards="):
            out.append(arg)
    return [*out, "--distributed"]


def blas_threads(n: int) -> dict[str, str]:
    """Each rank's share of this host's cores for OpenBLAS, unless the user chose: its threads
    spin while they wait, so N ranks with a thread per core each starve the peer a collective
    waits for (tensor parallel, 4 sequences, 2 ranks on 2 cores: 2.4-4.3 tok/s with 2 threads
    a rank, 14.4-16.9 with 1)."""
    if "OPENBLAS_NUM_THREADS" in os.environ:
        return {}
    return {"OPENBLAS_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}


def launch_shards(n: int, argv: list[str], shutdown_timeout: float) -> int:
    """Start `n` ranks of `mlxc serve --distributed` on 127.0.0.1, forward Ctrl-C/SIGTERM to
    rank 0 (which stops the others), and end every rank when one dies. Returns the exit code."""
    if n < 1:
        raise InputError("--shards must be at least 1")
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="mlxc-ring-",
                                     delete=False) as f:
        json.dump([[f"127.0.0.1:{p}"] for p in _free_ports(n)], f)
        hostfile = f.name
    command = [sys.executable, "-m", "mlxc", *rank_argv(argv)]
    procs = []
    try:
        for rank in range(n):
            env = {**os.environ, "MLX_RANK": str(rank), "MLX_HOSTFILE": hostfile,
                   "MLX_BACKEND": "ring", **blas_threads(n)} if n > 1 else dict(os.environ)
            # Own sessions: a terminal's Ctrl-C reaches this process only, which stops rank 0
            # first (its requests finish, then it releases the others).
            procs.append(subprocess.Popen(command, env=env, start_new_session=True))
        return _watch(procs, shutdown_timeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        Path(hostfile).unlink(missing_ok=True)


def _watch(procs: list[subprocess.Popen], shutdown_timeout: float) -> int:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    deadline, code = None, None
    while any([p.poll() is None for p in procs]):  # a list: every rank polled each time
        now = time.monotonic()
        lead = procs[0].returncode
        dead = [(r, p.returncode) for r, p in enumerate(procs[1:], 1)
                if p.returncode not in (None, 0)]
        if deadline is None and (stop.is_set() or dead or lead is not None):
            if dead:
                rank, rc = dead[0]
                print(f"mlxc: rank {rank} of {len(procs)} exited with code {rc}; the model is "
                      "incomplete without it, so the server stops (see its error above)",
                      file=sys.stderr, flush=True)
                code = 1
            if lead is None and not dead:
                procs[0].send_signal(signal.SIGTERM)  # finishes its requests, frees the others
            # A dead follower: rank 0's watcher (distributed/watch.py) answers its requests
            # and exits by itself; it is killed only if it has not in time.
            deadline = now + (FOLLOWER_EXIT_WAIT if lead is not None
                              else LOST_WAIT if dead
                              else shutdown_timeout + FOLLOWER_EXIT_WAIT)
        if deadline is not None and now > deadline:
            for r, p in enumerate(procs):
                if p.poll() is None:
                    print(f"mlxc: rank {r} did not stop in time; killed", file=sys.stderr)
                    p.kill()
            break
        time.sleep(0.1)
    for p in procs:
        p.wait()
    return code if code is not None else procs[0].returncode

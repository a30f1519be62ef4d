"""Each rank's liveness, watched outside MLX's collectives: a thread stuck in a ring
collective whose peer is gone cannot be interrupted (a graph of several collectives may wait
for ever instead of raising), so rank 0 must not learn of a lost rank from MLX alone.

Every follower holds a TCP connection to rank 0, made when the world is joined: rank 0
listens on a free port of the address its peers reach it at and shares that port and a
secret through the world (only its members can connect). The kernel closes a connection when
its process ends, however it ends (kill -9 included), and TCP keep-alive within ~5 s when a
host vanishes; rank 0's watcher thread sees the close at once and calls `on_lost` (serving.py:
every request is answered 503, then the process exits). A follower's watcher, seeing rank 0's
connection close, ends its rank (its collective would wait for ever too), unless rank 0 said
goodbye first (an orderly stop: the follower finishes writing its blocks and leaves).
A follower that fails says why on its connection before it goes, for rank 0's message."""

from __future__ import annotations

import json
import os
import secrets
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CONNECT_WAIT = 30.0  # s a follower tries to reach rank 0's watch port
ACCEPT_WAIT = 120.0  # s rank 0 waits for every follower to connect
STOP_GRACE = 30.0  # s a follower has, after rank 0's goodbye, to finish and leave
BYE = b"bye\n"
NAME_WAIT = 1.0  # s a failed collective waits for the watcher to see which rank closed


def leader_address() -> str:
    """An address of rank 0's host that the other ranks reach: the launcher's (the ring's
    hostfile, NCCL's or JACCL's coordinator), else this host's own."""
    path = os.environ.get("MLX_HOSTFILE")
    if path:
        try:
            return json.loads(Path(path).read_text())[0][0].rsplit(":", 1)[0]
        except (OSError, ValueError, LookupError, AttributeError):
            pass
    for name in ("NCCL_HOST_IP", "MLX_JACCL_COORDINATOR"):
        if value := os.environ.get(name):
            return value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return socket.gethostbyname(socket.gethostname())


def _keepalive(sock: socket.socket) -> None:
    """A vanished host (no FIN ever comes) is noticed within ~5 s, by the kernel."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", 2), ("TCP_KEEPALIVE", 2), ("TCP_KEEPINTVL", 1),
                        ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            try:
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
            except OSError:
                pass


class Watcher:
    """Rank 0's side: a connection from every follower, and a thread that watches them."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.address = leader_address()
        self.listener = socket.create_server((self.address, 0), backlog=size)
        self.token = secrets.token_hex(16)
        self.on_lost: Callable[[int, str], None] = _lost_before_serving
        self.closing = False  # an orderly stop: followers leaving are no loss
        self.connected: dict[int, socket.socket] = {}
        self.reasons: dict[int, str] = {}  # what a failing follower said before it went
        self._fired = False
        self._firing = threading.Lock()  # the watcher thread and a failed collective race

    def info(self) -> dict[str, Any]:
        return {"host": self.address, "port": self.listener.getsockname()[1],
                "token": self.token}

    def start(self) -> None:
        threading.Thread(target=self._run, name="mlxc-rank-watch", daemon=True).start()

    def goodbye(self) -> None:
        """Before the stop job: the followers are about to leave, and may."""
        self.closing = True
        for conn in list(self.connected.values()):
            try:
                conn.sendall(BYE)
            except OSError:
                pass

    def _run(self) -> None:
        picker = selectors.DefaultSelector()
        picker.register(self.listener, selectors.EVENT_READ)
        deadline = time.monotonic() + ACCEPT_WAIT
        ranks: dict[socket.socket, int] = {}
        while True:
            waiting = self.listener.fileno() >= 0 and len(self.connected) < self.size - 1
            if waiting and time.monotonic() > deadline:
                missing = sorted(set(range(1, self.size)) - set(self.connected))
                print(f"mlxc: rank(s) {missing} never reached rank 0's watch port "
                      f"{self.address}:{self.listener.getsockname()[1]}: a lost rank may "
                      "then hang requests (open that port between the hosts)",
                      file=sys.stderr, flush=True)
                picker.unregister(self.listener)
                self.listener.close()
            for key, _ in picker.select(timeout=1.0):
                if key.fileobj is self.listener:
                    self._accept(picker, ranks)
                    if len(self.connected) == self.size - 1:
                        picker.unregister(self.listener)
                        self.listener.close()
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(4096)
                except OSError as exc:
                    data, reason = b"", f"its connection failed: {exc}"
                else:
                    reason = "its process ended or was killed"
                rank = ranks[conn]
                if data:
                    said = data.decode(errors="replace").strip()
                    self.reasons[rank] = (self.reasons.get(rank, "") + " " + said).strip()
                    continue
                picker.unregister(conn)
                conn.close()
                if self.closing:
                    continue
                self.lost(rank, self.reasons.get(rank) or reason)
            if not picker.get_map():
                return

    def _accept(self, picker: selectors.BaseSelector, ranks: dict) -> None:
        conn, _ = self.listener.accept()
        try:
            conn.settimeout(5.0)
            hello = b""
            while not hello.endswith(b"\n") and len(hello) < 256:
                part = conn.recv(256)
                if not part:
                    break
                hello += part
            token, rank = hello.decode().split()
            rank = int(rank)
            if not secrets.compare_digest(token, self.token) or not 0 < rank < self.size:
                raise ValueError("not a rank of this world")
        except (OSError, ValueError, UnicodeDecodeError):
            conn.close()
            return
        conn.settimeout(None)
        _keepalive(conn)
        self.connected[rank] = conn
        ranks[conn] = rank
        picker.register(conn, selectors.EVENT_READ)

    def lost(self, rank: int | None, reason: str) -> None:
        """A rank is gone (`rank` None: a collective failed, the peer unknown): once."""
        with self._firing:
            if self._fired or self.closing:
                return
            self._fired = True
        self.on_lost(rank, reason)

    def collective_failed(self, reason: str) -> None:
        """A collective failed before the watcher saw a connection close: the close usually
        follows within milliseconds, and its message names the rank, so wait for it a moment."""
        deadline = time.monotonic() + NAME_WAIT
        while not self._fired and time.monotonic() < deadline:
            time.sleep(0.01)
        self.lost(None, reason)


def _lost_before_serving(rank: int | None, reason: str) -> None:
    """No request can be waiting yet (the model is loading): say so and end rank 0."""
    who = f"rank {rank}" if rank is not None else "another rank"
    print(f"mlxc: {who} of the sharded model is gone ({reason}) before the server was "
          "ready; restart every rank", file=sys.stderr, flush=True)
    os._exit(1)


class Link:
    """A follower's side: its connection to rank 0, and a thread that ends this rank when
    rank 0 goes without a goodbye."""

    def __init__(self, info: dict[str, Any], rank: int) -> None:
        self.rank = rank
        self.bye = threading.Event()
        deadline = time.monotonic() + CONNECT_WAIT
        while True:
            try:
                self.sock = socket.create_connection((info["host"], info["port"]), timeout=5)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise OSError(f"rank {rank} cannot reach rank 0's watch port "
                                  f"{info['host']}:{info['port']} ({exc}): open that port "
                                  "between the hosts") from exc
                time.sleep(0.2)
        self.sock.settimeout(None)
        _keepalive(self.sock)
        self.sock.sendall(f"{info['token']} {rank}\n".encode())
        threading.Thread(target=self._run, name="mlxc-rank-watch", daemon=True).start()

    def say(self, text: str) -> None:
        """Tell rank 0 why this rank is about to end."""
        try:
            self.sock.sendall((" ".join(text.split()) + "\n").encode())
        except OSError:
            pass

    def _run(self) -> None:
        while True:
            try:
                data = self.sock.recv(64)
            except OSError:
                data = b""
            if data.startswith(BYE):
                self.bye.set()
                continue
            if data:
                continue
            if self.bye.is_set():  # rank 0 stopped in order: the stop job is here or coming
                time.sleep(STOP_GRACE)
            else:
                print(f"mlxc: rank {self.rank}: rank 0 is gone (its connection closed); this "
                      "rank stops: restart every rank", file=sys.stderr, flush=True)
            os._exit(1)


def open_watch(group: Any, rank: int, size: int, share_from: Callable) -> Any:
    """Every rank together: rank 0's Watcher (started) or a follower's Link; None alone."""
    if size == 1:
        return None
    watcher = Watcher(size) if rank == 0 else None
    info = share_from(group, 0, watcher.info() if watcher else None)
    if watcher is not None:
        watcher.start()
        return watcher
    try:
        return Link(info, rank)
    except OSError as exc:  # serving still works; only a loss of this rank is not seen
        print(f"mlxc: {exc}; a lost rank may then hang requests", file=sys.stderr, flush=True)
        return None

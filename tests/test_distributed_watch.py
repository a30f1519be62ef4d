"""distributed/watch.py without a world: rank 0's Watcher takes a connection only with the
world's secret and a rank of it, hears a follower's closed connection at once (a process that
ends, however, closes it) with what the follower said before it went, and ignores followers
leaving after its goodbye. Followers are plain sockets here (a Link ends its process)."""

from __future__ import annotations

import socket
import threading
import time

from mlxc.distributed.watch import BYE, Watcher, leader_address


def watcher(size: int = 3) -> tuple[Watcher, list, threading.Event]:
    lost: list = []
    heard = threading.Event()
    w = Watcher(size)
    w.on_lost = lambda rank, reason: (lost.append((rank, reason)), heard.set())
    w.start()
    return w, lost, heard


def follower(w: Watcher, rank: int, token: str | None = None) -> socket.socket:
    info = w.info()
    sock = socket.create_connection((info["host"], info["port"]), timeout=5)
    sock.sendall(f"{token or info['token']} {rank}\n".encode())
    return sock


def until(check, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_closed_connection_is_a_lost_rank_with_its_reason():
    w, lost, heard = watcher()
    stranger = follower(w, 1, token="0" * 32)  # not the world's secret: dropped
    assert stranger.recv(16) == b""
    one, two = follower(w, 1), follower(w, 2)
    until(lambda: sorted(w.connected) == [1, 2])
    two.sendall(b"it failed: out of memory\n")
    time.sleep(0.1)
    started = time.monotonic()
    two.close()
    assert heard.wait(5)
    assert time.monotonic() - started < 1.0
    assert lost == [(2, "it failed: out of memory")]
    one.close()  # only the first loss ends the server
    time.sleep(0.2)
    assert len(lost) == 1


def test_followers_leaving_after_the_goodbye_are_no_loss():
    w, lost, _ = watcher(size=2)
    one = follower(w, 1)
    until(lambda: list(w.connected) == [1])
    w.goodbye()
    assert one.recv(16) == BYE
    one.close()
    time.sleep(0.3)
    assert lost == []


def test_rank_0_listens_where_the_launcher_said_it_is(tmp_path, monkeypatch):
    hostfile = tmp_path / "hosts.json"
    hostfile.write_text('[["127.0.0.1:5000", "127.0.0.1:5001"], ["10.0.0.2:5000"]]')
    monkeypatch.setenv("MLX_HOSTFILE", str(hostfile))  # mlx.launch's ring, or --shards
    assert leader_address() == "127.0.0.1"
    monkeypatch.delenv("MLX_HOSTFILE")
    monkeypatch.setenv("MLX_JACCL_COORDINATOR", "192.168.1.5:32323")
    assert leader_address() == "192.168.1.5"

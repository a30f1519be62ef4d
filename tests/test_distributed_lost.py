"""A rank lost from a sharded server (`mlxc serve --shards 2`, two CPU ranks over MLX's ring
backend on loopback) never hangs a request: rank 0 watches every rank's connection
(distributed/watch.py), not only its collectives (a tensor-parallel call of several
collectives can wait for ever on a peer that is gone), so when rank 1 is killed (-9) while
four streams decode, while prompts come in, or while idle, every client (the real openai
client) gets its error within LOST_BOUND seconds, rank 0 exits 1 naming the lost rank, and
the response and prefix caches on disk serve a restarted server."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from live_server import start_server, stop_server
from test_distributed_serve import lively_llama  # noqa: F401  (fixture)

LOST_BOUND = 10.0  # s from the kill to each client's error, and to rank 0's exit


def ranks_of(server) -> list[int]:
    pid = server.proc.pid
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)


def chat(url: str, text: str, max_tokens: int = 8) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens, "temperature": 0})


class Clients:
    """Requests running in threads; each ends with what it got and when."""

    def __init__(self) -> None:
        self.ended: list[tuple[str, float]] = []
        self.pieces: list[int] = []  # text pieces each stream has had
        self.threads: list[threading.Thread] = []

    def stream(self, url: str, text: str) -> None:
        me = len(self.pieces)
        self.pieces.append(0)

        def run() -> None:
            try:
                for chunk in client(url).chat.completions.create(
                        model="tiny", messages=[{"role": "user", "content": text}],
                        max_tokens=900, temperature=0, stream=True,
                        extra_body={"ignore_eos": True}):
                    if chunk.choices and chunk.choices[0].delta.content:
                        self.pieces[me] += 1
                self.ended.append(("finished", time.monotonic()))
            except openai.APIError as exc:  # a 503, or the stream's error event
                self.ended.append((f"{type(exc).__name__}: {exc}", time.monotonic()))
        self.threads.append(threading.Thread(target=run))
        self.threads[-1].start()

    def anthropic_stream(self, url: str, text: str) -> None:
        import anthropic

        me = len(self.pieces)
        self.pieces.append(0)

        def run() -> None:
            try:
                for event in anthropic.Anthropic(
                        base_url=url, api_key="none", max_retries=0, timeout=60
                        ).messages.create(model="tiny", max_tokens=900, stream=True,
                                          messages=[{"role": "user", "content": text}],
                                          extra_body={"temperature": 0}):
                    if event.type == "content_block_delta":
                        self.pieces[me] += 1
                self.ended.append(("finished", time.monotonic()))
            except anthropic.APIError as exc:  # the stream's `event: error`
                self.ended.append((f"anthropic {type(exc).__name__}: {exc}", time.monotonic()))
        self.threads.append(threading.Thread(target=run))
        self.threads[-1].start()

    def plain(self, url: str, text: str) -> None:
        def run() -> None:
            try:
                client(url).chat.completions.create(
                    model="tiny", messages=[{"role": "user", "content": text}],
                    max_tokens=200, temperature=0, extra_body={"ignore_eos": True})
                self.ended.append(("finished", time.monotonic()))
            except openai.APIError as exc:
                self.ended.append((f"{type(exc).__name__}: {exc}", time.monotonic()))
        self.threads.append(threading.Thread(target=run))
        self.threads[-1].start()

    def join(self) -> None:
        for t in self.threads:
            t.join(LOST_BOUND + 30)


def lose_rank_1(server, clients: Clients) -> tuple[int, float, str]:
    """kill -9 rank 1; (rank 0's exit code, seconds to it, the log)."""
    ranks = ranks_of(server)
    os.kill(ranks[1], signal.SIGKILL)
    killed = time.monotonic()
    code = server.proc.wait(timeout=60)
    took = time.monotonic() - killed
    clients.join()
    for kind, at in clients.ended:
        assert at - killed < LOST_BOUND, (kind, at - killed)
    assert all(not Path(f"/proc/{pid}").exists() for pid in ranks)
    return code, took, server.log.read_text()


def assert_said_clearly(code: int, took: float, log: str) -> None:
    assert code == 1, log
    assert took < LOST_BOUND, (took, log)
    assert "rank 1 of 2 (" in log and "is gone (its process ended or was killed)" in log, log
    assert "restart every rank" in log, log
    assert "rank 1 of 2 exited with code -9" in log, log  # --shards says it too
    assert "Traceback" not in log, log


def test_four_streams_decoding_get_their_error_and_the_caches_survive(
        tmp_path, lively_llama):  # noqa: F811
    server = start_server(tmp_path, lively_llama, "--shards", "2", "--max-batch", "4",
                          "--alias", "*")
    clients = Clients()
    try:
        before = chat(server.url, "Remember this one.")  # a stored answer, prefix blocks
        assert before.status_code == 200, before.text
        for n in range(3):
            clients.stream(server.url, f"Story {n}, as long as it goes.")
        clients.anthropic_stream(server.url, "Story 3, as long as it goes.")
        deadline = time.monotonic() + 60
        while min(clients.pieces) < 3:  # every stream is decoding
            assert time.monotonic() < deadline, clients.pieces
            time.sleep(0.02)
        clients.plain(server.url, "One more, waiting its turn.")  # queued behind the four
        code, took, log = lose_rank_1(server, clients)
    finally:
        stop_server(server, check=False)
    print(took, clients.pieces, clients.ended)
    assert len(clients.ended) == 5
    assert sum(kind.startswith("anthropic") for kind, _ in clients.ended) == 1
    assert all("rank 1 of 2" in kind and "restart every rank" in kind
               for kind, _ in clients.ended), clients.ended
    assert_said_clearly(code, took, log)
    again = start_server(tmp_path, lively_llama, "--shards", "2", "--alias", "*")
    try:  # the restarted ranks serve the answer stored before the loss, from disk
        reply = chat(again.url, "Remember this one.")
        assert reply.headers["x-mlxc-cache"] == "hit", reply.headers
        assert reply.json()["choices"][0]["message"]["content"] == \
            before.json()["choices"][0]["message"]["content"]
        follow = httpx.post(f"{again.url}/v1/chat/completions", timeout=60, json={
            "model": "tiny", "max_tokens": 4, "temperature": 0, "messages": [
                {"role": "user", "content": "Remember this one."},
                {"role": "assistant", "content": before.json()["choices"][0]["message"][
                    "content"]},
                {"role": "user", "content": "And then?"}]})
        head = follow.headers["x-mlxc-prefix"]
        assert int(head.split(";")[0].removeprefix("reused=").split("/")[0]) > 0, head
    finally:
        stop_server(again)


@pytest.mark.parametrize("when", ["prompts coming in", "idle"])
def test_a_rank_lost_while_prompts_come_in_or_idle(tmp_path, lively_llama, when):  # noqa: F811
    server = start_server(tmp_path, lively_llama, "--shards", "2", "--max-batch", "2",
                          "--alias", "*")
    clients = Clients()
    try:
        if when != "idle":
            for n in range(3):  # ~900-token prompts: two prefill chunks each, one waiting
                clients.plain(server.url, f"Read {n}: " + "the fox and the dog " * 180)
            deadline = time.monotonic() + 30
            while httpx.get(f"{server.url}/health", timeout=5).json()["batch"]["running"] < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
        code, took, log = lose_rank_1(server, clients)
    finally:
        stop_server(server, check=False)
    print(when, took, clients.ended)
    if when != "idle":
        assert len(clients.ended) == 3 and all(kind != "finished" for kind, _ in clients.ended)
    assert_said_clearly(code, took, log)


def test_a_follower_whose_rank_0_is_lost_ends_itself(tmp_path, lively_llama):  # noqa: F811
    server = start_server(tmp_path, lively_llama, "--shards", "2", "--alias", "*")
    try:
        ranks = ranks_of(server)
        os.kill(ranks[0], signal.SIGKILL)
        killed = time.monotonic()
        code = server.proc.wait(timeout=60)
        took = time.monotonic() - killed
    finally:
        stop_server(server, check=False)
    log = server.log.read_text()
    assert code != 0 and took < LOST_BOUND, (code, took, log)
    assert "rank 1: rank 0 is gone (its connection closed); this rank stops" in log, log
    assert "did not stop in time" not in log, log  # it left by itself, not killed by --shards

"""`mlxc bench --url A --url B`: several servers (replicas) measured as one, round-robin.

A conversation stays on the server of its first turn, as a balancer hashing on its session
key would keep it: the follow-up scenario then measures prefix reuse, not a cold replica.
Every request also carries that key as `X-Session-Id`, so a single --url pointing at a
balancer (examples/haproxy.cfg) keeps conversations together the same way."""

from __future__ import annotations

import hashlib
import itertools
import json
import threading
from dataclasses import replace

from mlxc.bench import RemoteBenchClient, Sample
from mlxc.request import GenerationRequest

SESSION_HEADER = "X-Session-Id"


def session_id(request: GenerationRequest) -> str:
    """The conversation a request belongs to: its messages up to the first user turn, so a
    follow-up (the same opening, more turns) has the key of its first turn."""
    opening = []
    for message in request.messages:
        opening.append(message.model_dump(mode="json", exclude_none=True))
        if message.role == "user":
            break
    canonical = json.dumps(opening, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


class ServersBenchClient:
    """Round-robin over RemoteBenchClients by conversation. Thread-safe."""

    def __init__(self, urls: list[str], api_key: str | None = None,
                 model: str | None = None) -> None:
        from mlxc.errors import InputError

        self.urls = list(dict.fromkeys(urls))
        self.clients: list[RemoteBenchClient] = []
        try:
            for url in self.urls:
                self.clients.append(RemoteBenchClient(url, api_key, model))
        except BaseException:
            self.close()
            raise
        names = {c.model for c in self.clients}
        if len(names) > 1:
            self.close()
            raise InputError(f"the servers run different models ({', '.join(map(str, names))}): "
                             "give --model to pick the one to measure on all of them")
        self.model = self.clients[0].model
        self.name = self.clients[0].name
        self._turn = itertools.cycle(range(len(self.clients)))
        self._home: dict[str, int] = {}
        self._lock = threading.Lock()

    def run(self, request: GenerationRequest, store: bool = True) -> Sample:
        if not store:  # the warm-up: every server pays its first-call costs outside the figures
            samples = [client.run(request, store=False) for client in self.clients]
            return replace(samples[0], server=self.urls[0])
        key = session_id(request)
        with self._lock:
            index = self._home.setdefault(key, next(self._turn))
        return replace(self.clients[index].run(request), server=self.urls[index])

    def close(self) -> None:
        for client in self.clients:
            client.close()

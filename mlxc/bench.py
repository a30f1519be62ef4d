"""`mlxc bench`: what the caches buy, measured on streamed requests.

Scenarios, in order, each on requests no earlier scenario sent (so a miss is a miss):
  miss        distinct requests, answered by the model (response cache cold)
  hit         the same requests again, answered from the response cache
  follow-up   a second turn on each miss: the prefix (KV) cache should spare its prefill
  concurrent  N clients at once, each with its own requests (one scenario per level of
              `--concurrency 1,2,4,8`: "concurrent 4" etc.; aggregate tokens/s per level)
and, in-process only, a reference run of the follow-ups on an engine without a prefix cache:
their time to first token without reuse, and whether reuse changed a greedy answer.

Each request is streamed, so every sample has its time to first token (TTFT), the gaps
between pieces of text (ITL), time per output token (TPOT) and end-to-end latency (E2E),
named as vLLM's serving benchmark names them. Figures: mlxc.bench_report.
"""

from __future__ import annotations

import gc
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from mlxc.request import GenerationRequest, Message

PROMPTS = [
    "What is the capital of France?",
    "Explain in two sentences what a compiler does.",
    "Name three rivers in Europe.",
    "Why is the sky blue?",
    "Write a haiku about the sea.",
    "What is a prime number?",
    "Give one tip for writing clear code.",
    "What does a CPU cache do?",
]
FOLLOW_UP = "Now say that again in one short sentence."
# A server stores an answer a moment after streaming its end; the hits wait that long.
SETTLE = 0.25


@dataclass
class Sample:
    """One streamed request: seconds since it was sent, and what came back."""

    scenario: str
    status: str  # hit | miss | bypass | unknown (a server that does not say)
    ttft: float
    e2e: float
    itl: list[float]
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens not recomputed: reused prefix, or all of them on a hit
    text: str = ""
    server: str = ""  # which --url answered, when several were given

    @property
    def tpot(self) -> float | None:
        n = self.completion_tokens
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in zip(times, times[1:], strict=False)]


class Client(Protocol):
    name: str

    def run(self, request: GenerationRequest, store: bool = True) -> Sample: ...
    def close(self) -> None: ...


class LocalClient:
    """The in-process engine, through mlxc.service like `mlxc ask`."""

    def __init__(self, settings: Any, progress: Callable[[str], None] | None = None) -> None:
        from mlxc.service import Service

        self.settings = settings
        self.service = Service(settings, progress=progress)
        self.name = self.service.ref.name
        self.service.engine().wait_loaded()  # loading is not part of any measurement

    def run(self, request: GenerationRequest, store: bool = True) -> Sample:
        from mlxc.stream import Delta, Failed, Finished

        started = time.perf_counter()
        reply = self.service.start(request, read=store, write=store)
        stored = threading.Event()  # runs after the service's own callback: the store write
        if reply.generation is not None:
            reply.generation.add_done_callback(lambda _event: stored.set())
        times, answer = [], None
        for event in reply.events():
            if isinstance(event, Delta):
                times.append(time.perf_counter())
            elif isinstance(event, Finished):
                answer = event.answer
            elif isinstance(event, Failed):
                raise event.error
        ended = time.perf_counter()
        if reply.generation is not None:
            # The end reaches us a moment before the answer is stored; a repeat sent in
            # that moment would miss. Not timed: the client already has its answer.
            stored.wait(10)
        usage = answer.usage
        return Sample(
            scenario="",
            status=reply.status,
            ttft=(times[0] if times else ended) - started,
            e2e=ended - started,
            itl=_gaps(times),
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
            cached_tokens=usage.prompt_tokens if reply.cached else usage.cached_tokens,
            text=answer.text,
        )

    def close(self) -> None:
        self.service.close()
        gc.collect()  # free MLX arrays now: a collection at exit can abort the process


class RemoteBenchClient:
    """Any OpenAI-compatible server, over streamed /v1/chat/completions."""

    def __init__(self, url: str, api_key: str | None = None, model: str | None = None) -> None:
        from mlxc.remote import RemoteClient

        self.client = RemoteClient(url, api_key)
        models = self.client.check()
        self.model = model or (models[0] if models else None)
        self.name = self.model or "?"

    def run(self, request: GenerationRequest, store: bool = True) -> Sample:
        from mlxc.bench_servers import SESSION_HEADER, session_id
        from mlxc.remote import chat_body

        # A balancer hashing on it keeps a conversation on one replica (examples/haproxy.cfg).
        headers = {SESSION_HEADER: session_id(request)}
        if not store:  # mlxc serve honours it: the warm-up neither reads nor leaves an answer
            headers["Cache-Control"] = "no-cache, no-store"
        result = self.client.chat(chat_body(request, self.model), headers=headers)
        times = result.chunk_times
        n = result.completion_tokens if result.completion_tokens is not None else len(times)
        return Sample(
            scenario="",
            status=result.cache,
            ttft=(times[0] if times else result.ended) - result.started,
            e2e=result.ended - result.started,
            itl=_gaps(times),
            prompt_tokens=result.prompt_tokens or 0,
            completion_tokens=n,
            cached_tokens=result.cached_tokens or 0,
            text=result.text,
        )

    def close(self) -> None:
        self.client.close()


@dataclass
class Plan:
    """What to send: base requests (from --prompts or the built-in list), sized by flags."""

    requests: list[GenerationRequest]
    count: int = 4
    concurrency: list[int] = field(default_factory=lambda: [4])  # clients at once, per level
    max_tokens: int = 64
    # A tag that keeps this run's prompts out of any cache that outlives it (a server's).
    tag: str = ""
    _next: int = 0

    def fresh(self) -> GenerationRequest:
        """A request no earlier one in this run (or, with a tag, any run) has sent."""
        k, self._next = self._next, self._next + 1
        base = self.requests[k % len(self.requests)]
        label = " ".join(p for p in (self.tag, str(k // len(self.requests) or "")) if p)
        return _relabel(base, label, self.max_tokens)


def _relabel(request: GenerationRequest, label: str, max_tokens: int) -> GenerationRequest:
    messages = [m.model_copy() for m in request.messages]
    if label:
        last = next(m for m in reversed(messages) if m.role == "user")
        last.content = f"({label}) {last.content}"
    return request.model_copy(update={"messages": messages, "max_tokens": max_tokens})


def default_plan(
    count: int, concurrency: int | list[int], max_tokens: int, tagged: bool
) -> Plan:
    requests = [GenerationRequest(messages=[{"role": "user", "content": p}]) for p in PROMPTS]
    levels = [concurrency] if isinstance(concurrency, int) else list(concurrency)
    return Plan(requests, count, levels, max_tokens, uuid.uuid4().hex[:6] if tagged else "")


def concurrency_scenario(level: int, levels: list[int]) -> str:
    return "concurrent" if len(levels) == 1 else f"concurrent {level}"


def follow_up(request: GenerationRequest, answer: str) -> GenerationRequest:
    messages = [*request.messages, Message(role="assistant", content=answer),
                Message(role="user", content=FOLLOW_UP)]
    return request.model_copy(update={"messages": messages})


@dataclass
class Result:
    samples: dict[str, list[Sample]] = field(default_factory=dict)
    walls: dict[str, float] = field(default_factory=dict)  # seconds each scenario took
    identical: dict[str, tuple[int, int]] = field(default_factory=dict)  # (same, compared)


class Listener(Protocol):
    def scenario(self, name: str, requests: int) -> None: ...
    def sample(self, sample: Sample) -> None: ...


def run(client: Client, plan: Plan, listener: Listener,
        reference: Callable[[], Client] | None = None) -> Result:
    """All scenarios on one client; `reference` makes a prefix-less one for the last."""
    result = Result()
    client.run(plan.fresh(), store=False)  # warm-up: first-call costs are no scenario's
    cold = [plan.fresh() for _ in range(plan.count)]
    misses = _serial(client, "miss", cold, result, listener)
    time.sleep(SETTLE)
    hits = _serial(client, "hit", cold, result, listener)
    result.identical["hit"] = _same(misses, hits)
    turns = [follow_up(r, s.text) for r, s in zip(cold, misses, strict=True)]
    follow = _serial(client, "follow-up", turns, result, listener)
    for level in plan.concurrency:  # the same number of requests at every level
        requests = [plan.fresh() for _ in range(max(plan.count, *plan.concurrency))]
        name = concurrency_scenario(level, plan.concurrency)
        _concurrent(client, requests, level, result, listener, name)
    if reference is not None:
        client.close()  # one engine at a time: MLX is driven from one thread
        other = reference()
        try:
            ref = _serial(other, "reference", turns, result, listener, store=False)
        finally:
            other.close()
        result.identical["prefix reuse"] = _same(ref, follow)
    return result


def _same(a: list[Sample], b: list[Sample]) -> tuple[int, int]:
    return sum(x.text == y.text for x, y in zip(a, b, strict=False)), min(len(a), len(b))


def _serial(client: Client, name: str, requests: list[GenerationRequest], result: Result,
            listener: Listener, store: bool = True) -> list[Sample]:
    listener.scenario(name, len(requests))
    samples, started = [], time.perf_counter()
    for request in requests:
        sample = replace(client.run(request, store=store), scenario=name)
        samples.append(sample)
        listener.sample(sample)
    result.walls[name] = time.perf_counter() - started
    result.samples[name] = samples
    return samples


def _concurrent(client: Client, requests: list[GenerationRequest], clients: int,
                result: Result, listener: Listener, name: str = "concurrent") -> None:
    """`clients` threads, each sending its share of the requests one after another."""
    listener.scenario(name, len(requests))
    samples: list[Sample] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def worker(share: list[GenerationRequest]) -> None:
        for request in share:
            try:
                sample = replace(client.run(request), scenario=name)
            except BaseException as exc:  # reported on the main thread
                errors.append(exc)
                return
            with lock:
                samples.append(sample)
                listener.sample(sample)

    threads = [threading.Thread(target=worker, args=(requests[i::clients],), daemon=True)
               for i in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(0.2)  # short waits keep Ctrl-C responsive
    if errors:
        raise errors[0]
    result.walls[name] = time.perf_counter() - started
    result.samples[name] = samples


def prefixless(settings: Any) -> Any:
    """The same settings with both prefix-cache tiers off: nothing is reused."""
    return replace(settings, prefix_memory_bytes=0, prefix_disk_bytes=0)


def machine() -> dict[str, Any]:
    import platform

    return {"system": platform.system(), "machine": platform.machine(),
            "python": platform.python_version(), "cpus": os.cpu_count()}

"""A generation's events, handed from the engine thread to any number of listeners.

The engine publishes `Delta`s then one `Finished` or `Failed`. Each subscriber, sync
(a thread, the CLI) or async (the server's event loop), sees every event from the first,
even if it joined late: that is what lets identical concurrent requests share one run.
When the last subscriber leaves before the end, the generation is cancelled.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from mlxc.request import Answer


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: list[dict] | None = None  # entries for the tokens behind this text, if asked


@dataclass(frozen=True)
class Finished:
    answer: Answer


@dataclass(frozen=True)
class Failed:
    error: Exception


Event = Delta | Finished | Failed


class Generation:
    """One run of the model, broadcast to its subscribers. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._events: list[Event] = []
        self._listeners: list[Callable[[Event], None]] = []
        self._subscribers = 0
        self._done_callbacks: list[Callable[[Event], None]] = []
        self._final: Event | None = None
        self.cancelled = threading.Event()  # read by the engine between tokens
        self.done = threading.Event()
        self.prompt_tokens_done = 0  # prefill progress, for keep-alives and progress bars
        self.prompt_tokens_total = 0
        # The whole prompt and the part reused from the prefix cache, set before prefill so
        # that a stream can report its usage up front (Anthropic's message_start).
        self.prompt_tokens = 0
        self.reused_tokens = 0
        self.prefix: Any = None  # kv/divergence.py's PrefixReport: why that much was reused

    @property
    def subscribers(self) -> int:
        """Listeners attached now (a stream's handler is one until its response is written)."""
        return self._subscribers

    def publish(self, event: Event) -> None:
        final = not isinstance(event, Delta)
        with self._lock:
            if self._final is not None:
                return
            if final:
                self._final = event
                callbacks = list(self._done_callbacks)
        if final:
            # Done callbacks (the store write) run before anyone hears the end, so a repeat
            # sent the moment a stream finishes is already a hit.
            for callback in callbacks:
                callback(event)
        with self._lock:
            self._events.append(event)
            listeners = list(self._listeners)
            if final:
                self.done.set()
        for listener in listeners:
            listener(event)

    def add_done_callback(self, callback: Callable[[Event], None]) -> None:
        """Call back with the final event (on the publishing thread) before subscribers see
        it; not a subscriber, so it does not keep an abandoned generation alive."""
        with self._lock:
            final = self._final
            if final is None:
                self._done_callbacks.append(callback)
        if final is not None:
            callback(final)

    def _attach(self, listener: Callable[[Event], None]) -> None:
        with self._lock:
            self._subscribers += 1
            for event in self._events:
                listener(event)
            self._listeners.append(listener)

    def _detach(self, listener: Callable[[Event], None]) -> None:
        with self._lock:
            if listener in self._listeners:
                self._listeners.remove(listener)
            self._subscribers -= 1
            abandoned = self._subscribers == 0 and not self.done.is_set()
        if abandoned:
            self.cancelled.set()

    def events(self, heartbeat: float | None = None) -> Iterator[Event | None]:
        """Blocking iterator for threads; yields None every `heartbeat` seconds of silence
        (when given) so a display can show prefill progress. Leaving early unsubscribes."""
        inbox: queue.SimpleQueue[Event] = queue.SimpleQueue()
        self._attach(inbox.put)
        try:
            while True:
                try:
                    event = inbox.get(timeout=heartbeat)
                except queue.Empty:
                    yield None
                    continue
                yield event
                if not isinstance(event, Delta):
                    return
        finally:
            self._detach(inbox.put)

    async def aevents(self, keepalive: float | None = None) -> AsyncIterator[Event | None]:
        """Async iterator for the event loop; yields None every `keepalive` seconds of silence
        (a stream sends an SSE comment then, so clients' first-byte watchdogs stay calm)."""
        import asyncio  # here, not at the top: the CLI's hit path never needs it

        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue[Event] = asyncio.Queue()

        def listener(event: Event) -> None:
            loop.call_soon_threadsafe(inbox.put_nowait, event)

        self._attach(listener)
        try:
            while True:
                try:
                    event = await asyncio.wait_for(inbox.get(), keepalive)
                except asyncio.TimeoutError:
                    yield None
                    continue
                yield event
                if not isinstance(event, Delta):
                    return
        finally:
            self._detach(listener)

    def result(self) -> Answer:
        """Wait for the end and return the answer (raises the engine's error)."""
        answer = None
        for event in self.events():
            if isinstance(event, Finished):
                answer = event.answer
            elif isinstance(event, Failed):
                raise event.error
        assert answer is not None
        return answer

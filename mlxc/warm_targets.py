"""Where `mlxc cache warm` sends lines: this process (LocalTarget, through mlxc.service) or
a running `mlxc serve` (RemoteTarget, over its OpenAI-compatible API). See mlxc.warm."""

from __future__ import annotations

import gc
import json
import threading
from collections.abc import Callable
from typing import Any

from mlxc.errors import InputError
from mlxc.warm import Line


class LocalTarget:
    """Warms through mlxc.service in this process: one Service per model the file names."""

    def __init__(self, settings: Any, prefix_only: bool = False, progress=None) -> None:
        self.settings = settings
        self.prefix_only = prefix_only
        self.progress = progress
        self.interrupted = False  # Ctrl-C came while a finished answer was being stored
        self._services: dict[str | None, Any] = {}

    def service(self, model: str | None):
        from mlxc.service import Service

        if model not in self._services:
            self._services[model] = Service(self.settings, model=model, progress=self.progress)
        return self._services[model]

    def key(self, line: Line) -> str:
        service = self.service(line.model)
        if self.prefix_only:
            return "prefix:" + service.key_for(line.request)
        if not service.is_cacheable(line.request):
            raise InputError(
                f"not cacheable under cache policy {service.settings.cache_policy!r}: "
                "give it temperature 0 or a seed (or use --cache-policy all)"
            )
        return service.key_for(line.request)

    def is_cached(self, line: Line) -> bool:
        # The prefix cache itself skips what it holds; the store is asked without counting.
        if self.prefix_only:
            return False
        service = self.service(line.model)
        return service.store.contains(service.key_for(line.request))

    def run(self, line: Line, on_text: Callable[[str], None]) -> tuple[str, int]:
        from mlxc.stream import Delta, Failed, Finished

        service = self.service(line.model)
        self._one_engine(service)
        if self.prefix_only:
            return "prefix", service.warm_prefix(line.request)
        # read=False: the store was asked already, and a warm-up must not count as misses.
        reply = service.start(line.request, read=False, write=True)
        stored = threading.Event()  # runs after the service's own callback, i.e. after the write
        reply.generation.add_done_callback(lambda _event: stored.set())
        answer = None
        for event in reply.events(heartbeat=0.2):
            if isinstance(event, Delta):
                on_text(event.text)
            elif isinstance(event, Finished):
                answer = event.answer
            elif isinstance(event, Failed):
                raise event.error
        try:
            landed = stored.wait(30)
        except KeyboardInterrupt:  # the answer is whole: let it land and count, then stop
            landed, self.interrupted = stored.wait(30), True
        if not landed or not service.store.contains(reply.key):
            raise InputError("the answer could not be stored")
        return "miss", answer.usage.completion_tokens

    def _one_engine(self, service: Any) -> None:
        """MLX wants one engine thread at a time: stop the others before this one starts
        (a stopped Service is dropped; a later line for its model makes a new one)."""
        for model, other in list(self._services.items()):
            if other is not service and other.engine_started:
                other.close()
                del self._services[model]

    def close(self) -> None:
        for service in self._services.values():
            service.close()
        # Free the model's MLX arrays here, not in a collection at interpreter exit, which
        # intermittently aborts the process ("terminate called without an active exception").
        gc.collect()


class RemoteTarget:
    """Warms through a running `mlxc serve` (or any OpenAI-compatible server)."""

    def __init__(self, url: str, api_key: str | None = None) -> None:
        from mlxc.remote import RemoteClient

        self.client = RemoteClient(url, api_key)
        self.models = self.client.check()  # fails fast, before any line is sent

    def key(self, line: Line) -> str:
        return json.dumps(self._body(line), sort_keys=True)

    @staticmethod
    def _body(line: Line) -> dict[str, Any]:
        from mlxc.remote import chat_body

        return chat_body(line.request, line.model)

    def is_cached(self, line: Line) -> bool:
        return False  # only the server knows; it answers a cached line at once

    def run(self, line: Line, on_text: Callable[[str], None]) -> tuple[str, int]:
        result = self.client.chat(self._body(line), on_text)
        if result.cache == "bypass":
            raise InputError("the server answered but did not cache it (its cache policy)")
        return result.cache, result.completion_tokens or len(result.chunk_times)

    def close(self) -> None:
        self.client.close()

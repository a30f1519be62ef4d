"""The Responses API's stream, in the official order:

    response.created, response.in_progress,
    [response.output_item.added (message), response.content_part.added,
     response.output_text.delta ..., response.output_text.done, response.content_part.done,
     response.output_item.done]
    [per tool call: response.output_item.added (function_call),
     response.function_call_arguments.delta, response.function_call_arguments.done,
     response.output_item.done]
    response.completed (or response.incomplete at max_output_tokens, response.failed)

Every event carries a `sequence_number` from 0; item ids derive from the response id."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from mlxc.request import Answer
from mlxc.server import responses_items as items
from mlxc.server import sse
from mlxc.server.errors import ApiError
from mlxc.server.pipeline import EventWriter
from mlxc.stream import Delta


class ResponsesWriter(EventWriter):
    sequence = 0
    message_open = False

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return sse.event(kind, payload)

    @property
    def base(self) -> str:
        return self.turn.id.removeprefix("resp_")

    def opening(self) -> Iterable[str]:
        snapshot = self.adapter.response(self.turn, None)
        yield self.event("response.created", response=snapshot)
        yield self.event("response.in_progress", response=snapshot)

    def _open_message(self) -> Iterable[str]:
        if self.message_open:
            return
        self.message_open = True
        item = items.message_item(self.base, "", status="in_progress")
        yield self.event("response.output_item.added", output_index=0, item=item)
        yield self.event("response.content_part.added", item_id=item["id"], output_index=0,
                         content_index=0, part=items.output_text(""))

    def delta(self, delta: Delta) -> Iterable[str]:
        yield from self._open_message()
        yield self.event("response.output_text.delta", item_id=f"msg_{self.base}",
                         output_index=0, content_index=0, delta=delta.text, logprobs=[])

    def finish(self, answer: Answer) -> Iterable[str]:
        calls = self.adapter.calls(self.turn, answer)
        index = 0
        if items.says_text(answer, calls):
            yield from self._open_message()
            item_id = f"msg_{self.base}"
            yield self.event("response.output_text.done", item_id=item_id, output_index=0,
                             content_index=0, text=answer.text, logprobs=[])
            yield self.event("response.content_part.done", item_id=item_id, output_index=0,
                             content_index=0, part=items.output_text(answer.text))
            yield self.event("response.output_item.done", output_index=0,
                             item=items.message_item(self.base, answer.text))
            index = 1
        spaces = items.namespaces(self.turn.body.tools)
        for i, call in enumerate(calls):
            done = items.function_call_item(self.base, i, call, spaces=spaces)
            started = items.function_call_item(self.base, i, call, "in_progress", spaces)
            yield self.event("response.output_item.added", output_index=index, item=started)
            yield self.event("response.function_call_arguments.delta", item_id=done["id"],
                             output_index=index, delta=done["arguments"])
            yield self.event("response.function_call_arguments.done", item_id=done["id"],
                             output_index=index, name=done["name"],
                             arguments=done["arguments"])
            yield self.event("response.output_item.done", output_index=index, item=done)
            index += 1
        final = self.adapter.response(self.turn, answer)
        kind = "response.incomplete" if final["status"] == "incomplete" else "response.completed"
        yield self.event(kind, response=final)

    def failed(self, error: ApiError) -> Iterable[str]:
        snapshot = {**self.adapter.response(self.turn, None), "status": "failed",
                    "error": {"code": error.code or "server_error", "message": error.message}}
        yield self.event("response.failed", response=snapshot)

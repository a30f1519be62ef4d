"""Live terminal display for generating commands: a status line on stderr while the model
loads or prefills, and the answer on stdout as it streams (the footer: cli/ask_flow.py)."""

from __future__ import annotations

import sys

from rich.console import Console

from mlxc.request import Answer
from mlxc.service import Reply
from mlxc.stream import Delta, Failed, Finished


class Display:
    def __init__(self) -> None:
        self.console = Console(stderr=True, highlight=False)
        self._status = None
        # Not a terminal (a log, CI): no live status line, but a first run's minutes of fetching
        # and converting the model are said in plain lines (set by `ask` while it is not ready).
        self.log_progress = False
        self._logged: str | None = None

    def __enter__(self) -> Display:
        if self.console.is_terminal:
            self._status = self.console.status("starting", spinner="dots")
            self._status.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop_status()

    def status(self, message: str) -> None:
        """Safe to call from the engine thread."""
        if self._status is not None:
            self._status.update(message)
        elif self.log_progress and message != self._logged:
            self._logged = message
            sys.stderr.write(f"mlxc: {message}\n")
            sys.stderr.flush()

    def _stop_status(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def stream(self, reply: Reply, print_text: bool = True) -> Answer:
        """Print the answer as it comes; Ctrl-C cancels the generation and stores nothing."""
        wrote_newline = True
        try:
            for event in reply.events(heartbeat=0.2):
                if event is None:
                    self._show_prefill(reply)
                elif isinstance(event, Delta):
                    self._stop_status()
                    if print_text:
                        sys.stdout.write(event.text)
                        sys.stdout.flush()
                        wrote_newline = event.text.endswith("\n")
                elif isinstance(event, Finished):
                    if print_text and not wrote_newline:
                        sys.stdout.write("\n")
                    return event.answer
                elif isinstance(event, Failed):
                    raise event.error
        except KeyboardInterrupt:
            self._stop_status()
            if reply.generation is not None:
                reply.generation.cancelled.set()
                reply.generation.done.wait(10)  # let the engine stop between two tokens
            self.console.print("\n[yellow]cancelled[/yellow] — nothing was cached")
            return Answer(text="", finish_reason="cancelled")
        raise RuntimeError("the generation ended without a result")

    def _show_prefill(self, reply: Reply) -> None:
        if self._status is None:
            return  # a live counter, for the status line only
        gen = reply.generation
        if gen is not None and gen.prompt_tokens_total:
            self.status(f"prefilling {gen.prompt_tokens_done}/{gen.prompt_tokens_total} tokens")
        else:
            self.status("loading the model")

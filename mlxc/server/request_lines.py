"""The request log's lines to a file or a pipe, one write per turn of the event loop.

A line per request, written and flushed at once, was two system calls on the event loop per
request (and a third for the time stamp's time zone check): each one lets the engine
thread take the GIL for up to a switch interval while hits wait (issue 30, point 7). Lines
said on the loop are gathered and written together at the loop's next turn: under load
that is one write for many requests; when idle the line is written within microseconds. A
crash loses at most the lines of one turn. Lines from other threads are written at once, as
before.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import TextIO


class LoopLines:
    """Callable: `lines("text")` writes `HH:MM:SS text` and a newline to `file`."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self._pending: list[str] = []
        self._lock = threading.Lock()  # the file is shared with lines from other threads
        self._second = -1
        self._stamp = ""

    def stamp(self) -> str:
        """The local time, HH:MM:SS, computed once a second."""
        now = int(time.time())
        if now != self._second:
            self._second, self._stamp = now, time.strftime("%H:%M:%S", time.localtime(now))
        return self._stamp

    def __call__(self, line: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not the event loop's thread: written now
            text = f"{time.strftime('%H:%M:%S')} {line}\n"
            with self._lock:
                self.file.write(text)
                self.file.flush()
            return
        if not self._pending:
            loop.call_soon(self.flush)  # after the callbacks of this turn
        self._pending.append(f"{self.stamp()} {line}\n")

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        if pending:
            with self._lock:
                self.file.write("".join(pending))
                self.file.flush()

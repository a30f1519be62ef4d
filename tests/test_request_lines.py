"""The request log's lines: one write per turn of the event loop, lines from other threads
at once, every line whole and in order, each with its HH:MM:SS stamp."""

from __future__ import annotations

import asyncio
import io
import re
import threading

from mlxc.server.request_lines import LoopLines


class CountedFile(io.StringIO):
    """A text file that counts its writes and flushes (what reaches the system)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes = 0
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


def test_lines_said_in_one_turn_are_one_write_and_written_by_the_next():
    file = CountedFile()
    lines = LoopLines(file)

    async def requests() -> tuple[int, str]:
        for i in range(50):  # fifty requests finishing in the same turn
            lines(f"POST /v1/chat/completions 200 hit {i} ms")
        unwritten = file.getvalue()
        await asyncio.sleep(0)  # the loop's next turn
        return file.writes, unwritten

    writes, unwritten = asyncio.run(requests())
    assert unwritten == "" and writes == 1 and file.flushes == 1
    text = file.getvalue().splitlines()
    assert len(text) == 50
    assert all(re.fullmatch(rf"\d\d:\d\d:\d\d POST /v1/chat/completions 200 hit {i} ms", line)
               for i, line in enumerate(text))


def test_a_line_from_another_thread_is_written_at_once():
    file = CountedFile()
    lines = LoopLines(file)
    thread = threading.Thread(target=lines, args=("prefix /v1/chat/completions reused=0/9",))
    thread.start()
    thread.join()
    assert re.fullmatch(r"\d\d:\d\d:\d\d prefix /v1/chat/completions reused=0/9\n",
                        file.getvalue())
    assert file.flushes == 1


def test_flush_writes_what_a_stopped_loop_left():
    file = CountedFile()
    lines = LoopLines(file)

    async def last_request() -> None:
        lines("GET /health 200 - 1 ms")  # the loop stops before its next turn

    loop = asyncio.new_event_loop()
    loop.run_until_complete(last_request())
    loop.close()
    lines.flush()
    assert file.getvalue().endswith(" GET /health 200 - 1 ms\n")

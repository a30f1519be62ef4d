"""What `mlxc ask` does once its arguments are parsed, by typer (cli/ask.py) or, for the
common forms, by cli/ask_argv.py. A cache hit is answered without Rich or the engine: only
a miss imports them, to stream the generation."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class AskArgs:
    """`mlxc ask`'s arguments; the defaults are the command line's (cli/ask.py uses them)."""

    prompt: str | None = None
    system: str | None = None
    model: str | None = None
    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    no_cache: bool = False
    refresh: bool = False
    as_json: bool = False
    cache_dir: Path | None = None
    cache_policy: str | None = None
    dtype: str | None = None
    continue_: bool = False
    speculate: str | None = None
    draft_model: str | None = None


_stdin: list[str | None] = []


def piped_text() -> str | None:
    """Text piped into stdin (None from a terminal), read once: the hit path (ask_hit.py) may
    read it before this module's run_ask does."""
    if not _stdin:
        _stdin.append(None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read())
    return _stdin[0]


def run_ask(args: AskArgs, missed_key: str | None = None) -> int:
    """Ask, print the answer and a footer (or one JSON object); the exit code (130: cancelled).
    `missed_key`: looked up (and counted) by ask_hit.py already. Raises mlxc.errors.USER_ERRORS
    for the entry point to print as one line."""
    from mlxc.config import load_settings
    from mlxc.conversation import build_messages, continue_with, load_last, save_last
    from mlxc.errors import InputError
    from mlxc.request import GenerationRequest
    from mlxc.service import Reply, Service

    stdin_text = piped_text()
    if not (args.prompt or "").strip() and not (stdin_text or "").strip():
        raise InputError('the prompt is empty: mlxc ask "your question" (or pipe text in)')
    messages = build_messages(args.prompt, args.system, stdin_text)
    settings = load_settings().with_overrides(  # MLXC_* variables, then flags on top
        cache_dir=args.cache_dir, cache_policy=args.cache_policy, dtype=args.dtype,
        model=args.model, speculate=args.speculate, draft_model=args.draft_model,
    )
    if args.continue_:
        if (last := load_last(settings)) is None:
            raise InputError("there is no conversation to continue: ask something first")
        settings = settings if args.model else settings.with_overrides(model=last[0])
        messages = continue_with(last[1], messages)
    request = GenerationRequest(
        messages=messages, max_tokens=args.max_tokens, temperature=args.temperature,
        top_p=args.top_p, seed=args.seed,
    )
    read, write = not (args.no_cache or args.refresh), not args.no_cache
    display = None
    started = time.perf_counter()
    service = Service(settings, progress=lambda message: display and display.status(message))
    try:
        answer, key = _stored(service, request, missed_key) if read else (None, None)
        if answer is not None:
            reply = Reply("hit", key, answer=answer)
            print_text(answer.text, not args.as_json)
        else:
            from mlxc.cli.render import Display

            display = Display()
            display.log_progress = not service.ref.is_ready  # the first run fetches or converts
            with display:  # read: a miss already counted is not looked up twice
                reply = service.start(request, read=read and key is None, write=write)
                answer = display.stream(reply, print_text=not args.as_json)
    finally:
        service.close()
    latency_ms = (time.perf_counter() - started) * 1000
    if answer.finish_reason != "cancelled":
        save_last(settings, settings.model, messages, answer.text)
    usage = answer.usage
    if args.as_json:
        print_json(reply.cached, reply.key, service.ref.name, latency_ms, answer.text,
                   answer.finish_reason, usage.prompt_tokens, usage.completion_tokens)
    elif answer.finish_reason != "cancelled":
        print_footer(hit_line(reply.key, latency_ms) if reply.cached else _miss_line(reply, answer))
    return 130 if answer.finish_reason == "cancelled" else 0


def _stored(service, request, missed_key: str | None):
    """(answer, key) from the store before any display exists; (None, key) after a counted
    miss; (None, None) when the store cannot be read yet (model not on disk, not cacheable)."""
    if not service.ref.is_ready or not service.is_cacheable(request):
        return None, None
    key = service.key_for(request)
    if key == missed_key:
        return None, key
    return service.lookup(key), key


def print_text(text: str, show: bool = True) -> None:
    """A hit's text as Display.stream prints a stream: ended by a newline."""
    if show and text:
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        sys.stdout.flush()


def hit_line(key: str, latency_ms: float) -> str:
    return f"cache hit · {latency_ms:.0f} ms · key {key[:12]}"


def _miss_line(reply, answer) -> str:
    usage = answer.usage
    return (
        f"{reply.status} · {usage.completion_tokens} tokens · "
        f"{answer.tokens_per_second:.1f} tok/s · prefill {answer.prefill_seconds:.2f} s "
        f"({usage.prompt_tokens} tokens"
        + (f", {usage.cached_tokens} reused" if usage.cached_tokens else "")
        + f") · {answer.finish_reason}"
        + (f" · {usage.accepted_tokens} of {usage.drafted_tokens} drafts taken"
           if usage.drafted_tokens else "")
    )


def print_footer(line: str) -> None:
    """Dim on a terminal, as Rich prints `[dim]...[/dim]`; plain otherwise (Rich itself would
    cost a hit ~30 ms to import)."""
    styled = (sys.stderr.isatty() or bool(os.environ.get("FORCE_COLOR"))) and os.environ.get(
        "TERM", "") not in ("dumb", "unknown")
    sys.stderr.write(f"\x1b[2m{line}\x1b[0m\n" if styled else f"{line}\n")
    sys.stderr.flush()


def print_json(cached: bool, key: str | None, model: str, latency_ms: float, text: str,
               finish_reason: str, prompt_tokens: int, completion_tokens: int) -> None:
    body = {
        "text": text,
        "cached": cached,
        "key": key,
        "model": model,
        "latency_ms": round(latency_ms, 1),
        "finish_reason": finish_reason,
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens},
    }
    print(json.dumps(body, ensure_ascii=False), flush=True)

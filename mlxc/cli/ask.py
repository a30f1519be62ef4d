"""`mlxc ask`: one prompt, streamed live; a repeat comes from the response cache."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated

import typer

from mlxc.cli.options import (
    CacheDirOption,
    CachePolicyOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    settings_from,
)

EXAMPLES = """
[bold]Examples[/bold]

  mlxc ask "What is MLX?"

  git diff | mlxc ask "Review this change" -s "You are a careful reviewer"

  mlxc ask "Name three rivers" --max-tokens 64 --json | jq .text

  mlxc ask "Write a haiku" --temperature 0.8 --seed 7   # seeded: cached too

  mlxc ask -c "And in one sentence?"   # continue the last conversation
"""


def ask(
    prompt: Annotated[
        str | None, typer.Argument(help="The question; piped stdin joins it.")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    model: ModelOption = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = 512,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="0 is greedy (and cached).")
    ] = 0.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = 1.0,
    seed: Annotated[
        int | None, typer.Option(help="Random seed: makes sampling repeatable.")
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Neither read nor write the response cache.")
    ] = False,
    refresh: Annotated[
        bool, typer.Option("--refresh", help="Regenerate and overwrite the cached answer.")
    ] = False,
    as_json: JsonOption = False,
    cache_dir: CacheDirOption = None,
    cache_policy: CachePolicyOption = None,
    dtype: DtypeOption = None,
    continue_: Annotated[
        bool,
        typer.Option("--continue", "-c", help="Continue the last conversation (its model too)."),
    ] = False,
) -> None:
    """Ask the model one question; the answer streams as it is generated.

    A repeat (same model, messages and settings) comes from the disk cache in a blink."""
    from mlxc.cli.render import Display
    from mlxc.conversation import build_messages, continue_with, load_last, save_last
    from mlxc.errors import InputError
    from mlxc.request import GenerationRequest
    from mlxc.service import Service

    stdin_text = None if sys.stdin is None or sys.stdin.isatty() else sys.stdin.read()
    if not (prompt or "").strip() and not (stdin_text or "").strip():
        raise InputError('the prompt is empty: mlxc ask "your question" (or pipe text in)')
    messages = build_messages(prompt, system, stdin_text)
    settings = settings_from(cache_dir, cache_policy, dtype, model)
    if continue_:
        if (last := load_last(settings)) is None:
            raise InputError("there is no conversation to continue: ask something first")
        settings = settings if model else settings.with_overrides(model=last[0])
        messages = continue_with(last[1], messages)
    request = GenerationRequest(
        messages=messages,
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    display = Display(quiet=as_json)
    started = time.perf_counter()
    service = Service(settings, progress=display.status)
    display.log_progress = not service.ref.is_ready  # the first run fetches or converts it
    try:
        with display:
            reply = service.start(request, read=not (no_cache or refresh), write=not no_cache)
            answer = display.stream(reply, print_text=not as_json)
    finally:
        service.close()
    latency_ms = (time.perf_counter() - started) * 1000
    if answer.finish_reason != "cancelled":
        save_last(settings, settings.model, messages, answer.text)
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "text": answer.text,
                    "cached": reply.cached,
                    "key": reply.key,
                    "model": service.ref.name,
                    "latency_ms": round(latency_ms, 1),
                    "finish_reason": answer.finish_reason,
                    "usage": {
                        "prompt_tokens": answer.usage.prompt_tokens,
                        "completion_tokens": answer.usage.completion_tokens,
                    },
                },
                ensure_ascii=False,
            )
        )
    else:
        display.footer(reply, answer, latency_ms)
    if answer.finish_reason == "cancelled":
        raise typer.Exit(130)

"""`mlxc ask`: one prompt, streamed live; a repeat comes from the response cache."""

from __future__ import annotations

from typing import Annotated

import typer

from mlxc.cli.ask_flow import AskArgs, run_ask
from mlxc.cli.options import (
    CacheDirOption,
    CachePolicyOption,
    DraftModelOption,
    DtypeOption,
    JsonOption,
    ModelOption,
    SpeculateOption,
)

EXAMPLES = """
[bold]Examples[/bold]

  mlxc ask "What is MLX?"

  git diff | mlxc ask "Review this change" -s "You are a careful reviewer"

  mlxc ask "Name three rivers" --max-tokens 64 --json | jq .text

  mlxc ask "Write a haiku" --temperature 0.8 --seed 7   # seeded: cached too

  mlxc ask -c "And in one sentence?"   # continue the last conversation

  mlxc ask "Fix the typo" < main.py --draft-model ./SmolLM2-135M   # a draft model drafts
"""


def ask(
    prompt: Annotated[
        str | None, typer.Argument(help="The question; piped stdin joins it.")
    ] = None,
    system: Annotated[str | None, typer.Option("--system", "-s", help="System prompt.")] = None,
    model: ModelOption = None,
    max_tokens: Annotated[int, typer.Option(help="Most tokens to generate.")] = AskArgs.max_tokens,
    temperature: Annotated[
        float, typer.Option("--temperature", "-t", help="0 is greedy (and cached).")
    ] = AskArgs.temperature,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling mass.")] = AskArgs.top_p,
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
    speculate: SpeculateOption = None,
    draft_model: DraftModelOption = None,
) -> None:
    """Ask the model one question; the answer streams as it is generated.

    A repeat (same model, messages and settings) comes from the disk cache in a blink."""
    code = run_ask(AskArgs(
        prompt=prompt, system=system, model=model, max_tokens=max_tokens,
        temperature=temperature, top_p=top_p, seed=seed, no_cache=no_cache, refresh=refresh,
        as_json=as_json, cache_dir=cache_dir, cache_policy=cache_policy, dtype=dtype,
        continue_=continue_, speculate=speculate, draft_model=draft_model,
    ))
    if code:
        raise typer.Exit(code)

"""`mlxc ask`'s cache hit without pydantic, Rich or the engine: the key is built by hand
(request_key.chat_payload) and the stored answer read as the JSON it is. Importing pydantic
took more of a hit's time than all the rest.

Anything this path does not handle (a model not on disk yet, --continue, an answer of an
unexpected shape, an error) is left to ask_flow.run_ask, which a miss goes on to as well.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from mlxc.cli.ask_flow import AskArgs, hit_line, piped_text, print_footer, print_json, print_text

_FINISH_REASONS = ("stop", "length", "tool_calls", "cancelled")


@dataclass
class Lookup:
    """What the store gave: an answer (a hit), or only the key (a miss, counted as
    Service.lookup counts it), or nothing when it was not read."""

    key: str | None = None
    answer: tuple[str, str, int, int] | None = None  # text, finish reason, token counts
    model: str = ""
    settings: Any = None
    messages: list[dict] | None = None
    started: float = 0.0


def look_up(args: AskArgs) -> Lookup:
    """Never raises: whatever went wrong, run_ask meets it again and says what it is."""
    if args.no_cache or args.refresh or args.continue_:
        return Lookup()
    try:
        return _look_up(args)
    except Exception:  # run_ask reports it, as one line
        return Lookup()


def print_hit(args: AskArgs, found: Lookup) -> None:
    """As run_ask prints a hit: the text, then the footer or one JSON object."""
    from mlxc.conversation import save_last

    text, finish_reason, prompt_tokens, completion_tokens = found.answer
    print_text(text, not args.as_json)
    latency_ms = (time.perf_counter() - found.started) * 1000
    save_last(found.settings, found.settings.model, found.messages, text)
    if args.as_json:
        print_json(True, found.key, found.model, latency_ms, text, finish_reason, prompt_tokens,
                   completion_tokens)
    else:
        print_footer(hit_line(found.key, latency_ms))


def _look_up(args: AskArgs) -> Lookup:
    from mlxc.config import load_settings
    from mlxc.conversation import build_messages
    from mlxc.model.refs import model_fingerprint, resolve_model
    from mlxc.request_key import cache_key, chat_payload
    from mlxc.store import open_store

    stdin_text = piped_text()
    if not (args.prompt or "").strip() and not (stdin_text or "").strip():
        return Lookup()
    settings = load_settings().with_overrides(
        cache_dir=args.cache_dir, cache_policy=args.cache_policy, dtype=args.dtype,
        model=args.model,
    )
    deterministic = args.temperature == 0.0 or args.seed is not None  # as Service.is_cacheable
    policy = settings.cache_policy
    if not (policy == "all" or (policy == "deterministic" and deterministic)):
        return Lookup()
    started = time.perf_counter()
    ref = resolve_model(settings.model, settings)
    if (fingerprint := model_fingerprint(ref, settings)) is None:
        return Lookup()  # not on disk yet: run_ask fetches or converts it, and says so
    messages = build_messages(args.prompt, args.system, stdin_text)
    payload = chat_payload(messages, args.max_tokens, args.temperature, args.top_p, args.seed)
    key = cache_key(payload, fingerprint)
    store = open_store(settings)
    try:
        value = store.get(key)
    finally:
        store.close()
    return Lookup(key, _plain_answer(value), ref.name, settings, messages, started)


def _plain_answer(value: Any) -> tuple[str, str, int, int] | None:
    """What a hit prints of a stored Answer (request.Answer's dump), checked as pydantic checks
    those fields; None for a miss or anything else (run_ask then validates it itself)."""
    if not isinstance(value, dict) or not isinstance(text := value.get("text"), str):
        return None
    finish_reason = value.get("finish_reason", "stop")
    usage = value.get("usage", {})
    if finish_reason not in _FINISH_REASONS or not isinstance(usage, dict):
        return None
    counts = [usage.get(name, 0) for name in ("prompt_tokens", "completion_tokens")]
    if not all(type(n) is int for n in counts):
        return None
    return text, finish_reason, counts[0], counts[1]

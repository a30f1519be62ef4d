"""The last `mlxc ask` conversation, kept so that `mlxc ask -c` can continue it (as `llm -c`).

One small JSON file under the cache folder: the model as the user named it and the messages,
the last answer included. No MLX; written atomically, readable only by the user.
"""

from __future__ import annotations

from pathlib import Path

from mlxc.config import Settings
from mlxc.sidecar import read_json, write_json

LAST_FILE = "last-conversation.json"
LAST_LIMIT = 64 << 20  # a long conversation, not a sidecar's few numbers


def last_path(settings: Settings) -> Path:
    return settings.cache_dir / LAST_FILE


def load_last(settings: Settings) -> tuple[str, list[dict]] | None:
    """(model, messages) of the last conversation, or None if there is none readable."""
    saved = read_json(last_path(settings), LAST_LIMIT)
    try:
        messages = saved["messages"]
        if isinstance(saved["model"], str) and isinstance(messages, list):
            return saved["model"], messages
    except (KeyError, TypeError):
        pass
    return None


def save_last(settings: Settings, model: str, messages: list[dict], answer: str) -> None:
    """Remember the conversation with its answer; a failure to write only costs `-c`."""
    body = {"model": model, "messages": [*messages, {"role": "assistant", "content": answer}]}
    write_json(last_path(settings), body)


def continue_with(previous: list[dict], new: list[dict]) -> list[dict]:
    """The previous messages, then the new turn; a new system prompt replaces the old one."""
    if new and new[0]["role"] == "system":
        previous = [m for m in previous if m.get("role") != "system"]
        return [new[0], *previous, *new[1:]]
    return [*previous, *new]


def build_messages(prompt: str | None, system: str | None, stdin_text: str | None) -> list[dict]:
    """Piped text comes first, then the prompt argument (as in `llm`)."""
    user = "\n\n".join(part for part in (stdin_text, prompt) if part and part.strip())
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": user}]

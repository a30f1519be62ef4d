"""The last `mlxc ask` conversation, kept so that `mlxc ask -c` can continue it (as `llm -c`).

One small JSON file under the cache folder: the model as the user named it and the messages,
the last answer included. No MLX; written atomically, readable only by the user.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from mlxc.config import Settings

LAST_FILE = "last-conversation.json"


def last_path(settings: Settings) -> Path:
    return settings.cache_dir / LAST_FILE


def load_last(settings: Settings) -> tuple[str, list[dict]] | None:
    """(model, messages) of the last conversation, or None if there is none readable."""
    try:
        saved = json.loads(last_path(settings).read_text())
        messages = saved["messages"]
        if isinstance(saved["model"], str) and isinstance(messages, list):
            return saved["model"], messages
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def save_last(settings: Settings, model: str, messages: list[dict], answer: str) -> None:
    """Remember the conversation with its answer; a failure to write only costs `-c`."""
    path = last_path(settings)
    body = {"model": model, "messages": [*messages, {"role": "assistant", "content": answer}]}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temp = path.with_name(f".{LAST_FILE}.{os.getpid()}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(body, f, ensure_ascii=False)
        os.replace(temp, path)
    except OSError:
        pass


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

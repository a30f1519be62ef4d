"""Where turns begin and end in a conversation's tokens, as the model's chat template renders
them: the prefix cache keeps states at these points (message boundaries) and prefills the next
turn's opening ahead of time. No MLX here: templates and tokenizers only.
"""

from __future__ import annotations

from typing import Any

from mlxc.engine.decode.tools import template_messages  # messages as the engine renders them


def _render(tokenizer: Any, messages: list[dict], tools: Any) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tools=tools, add_generation_prompt=False, tokenize=False
    )
    return tokenizer.encode(text, add_special_tokens=False)


def message_boundaries(tokenizer: Any, request: Any, tokens: list[int]) -> list[tuple[int, str]]:
    """Token positions where the system prompt and the whole conversation (before the answer's
    header) end, when the chat template renders them as prefixes of `tokens`."""
    messages = template_messages(request.messages or [])
    cuts = [(1, "system")] if messages and messages[0]["role"] == "system" else []
    cuts.append((len(messages), "user"))
    found = []
    for k, kind in cuts:
        try:
            ids = _render(tokenizer, messages[:k], request.tools)
        except Exception:  # some templates refuse a partial conversation: no boundary then
            continue
        if 0 < len(ids) < len(tokens) and tokens[: len(ids)] == ids:
            found.append((len(ids), kind))
    return sorted(set(found))


def next_turn_opening(tokenizer: Any, request: Any, answer: str, key: list[int]) -> list[int]:
    """The tokens the template puts between this answer and the next user message's text
    (ChatML: `<|im_end|>`, newline, `<|im_start|>user`, newline), when it renders the
    conversation so far as `key` (prompt + answer tokens) followed by them; else none."""
    if not request.messages:
        return []
    so_far = [*template_messages(request.messages), {"role": "assistant", "content": answer}]
    try:  # two different next messages: what both put after `key` is the opening
        one, other = (
            _render(tokenizer, [*so_far, {"role": "user", "content": text}], request.tools)
            for text in ("A", "B")
        )
    except Exception:  # a template that refuses this conversation: nothing to guess
        return []
    if one[: len(key)] != key:
        return []
    shared = len(key)
    while shared < min(len(one), len(other)) and one[shared] == other[shared]:
        shared += 1
    return one[len(key) : shared]

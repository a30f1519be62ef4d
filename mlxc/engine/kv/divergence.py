"""Why a prompt missed: how many of its tokens the prefix cache reused, from which tier, and
where the longest stored neighbour (the same conversation's earlier turn, or any stored
prompt) parted from it.

`explain` runs on the engine thread right after a fetch and only compares tokens (the block
tree's walk, a few array slices). Which message and character that token is in, and the old
and new text around it, are worked out later and only when asked (`PrefixReport.resolve`,
in a worker thread: a template render and a decode). No MLX here.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from os.path import commonprefix
from typing import Any

CONTEXT_TOKENS = 24  # kept each side of the divergence, for the excerpts
EXCERPT_CHARS = 60  # at most, each side


@dataclass(slots=True)
class Where:
    """Where a token sits in the request: a message's content (`part` "message", with its
    index and role), the tools list, the raw prompt, or the template's markup around them."""

    part: str  # "message" | "tools" | "prompt" | "markup"
    char: int  # offset in that message's content (or in the tools text, or the prompt)
    index: int | None = None
    role: str | None = None

    def label(self) -> str:
        if self.part == "message":
            return f"message {self.index} @ char {self.char}"
        if self.part == "markup":
            return f"template before message {self.index}"
        return f"{self.part} @ char {self.char}"


@dataclass(slots=True)
class PrefixReport:
    """One generation's prefix reuse. `diverged_at` is the prompt token where the longest
    stored neighbour goes on differently; None when nothing stored goes on past the match
    (the prompt extends what was stored: a full reuse) or nothing was stored at all."""

    prompt_tokens: int
    reused: int
    tier: str  # "memory" | "disk" | "memory+disk" | "none"
    matched: int = 0  # tokens the neighbour shares (reuse may stop short of it: one token is
    #                   always left to feed, and fewer than 8 are not worth reusing)
    diverged_at: int | None = None
    layout: str = "blocks"  # "states": whole states, whose neighbours are not compared
    new: array | None = None  # prompt tokens from `start` (CONTEXT_TOKENS each side)
    old: array | None = None  # the neighbour's tokens after `diverged_at`
    start: int = 0
    where: Where | None = None
    excerpts: dict[str, str] | None = None
    recorded: bool = False  # by the server's list of misses (once per generation)
    _source: Any = field(default=None, repr=False)  # (tokenizer, request, tokens) until resolved

    @property
    def full(self) -> bool:
        return self.diverged_at is None and self.reused > 0

    def attach(self, tokenizer: Any, request: Any, tokens: list[int]) -> None:
        """What `resolve` needs, kept only while it is pending."""
        if self.diverged_at is not None:
            self._source = (tokenizer, request, tokens)

    def resolve(self, excerpts: bool = True) -> PrefixReport:
        """Work out `where` (and the excerpts, if wanted) once; thread-safe enough for one
        caller (the server resolves each report once, in a worker thread)."""
        source, self._source = self._source, None
        if source is None:
            return self
        tokenizer, request, tokens = source
        try:
            cut = self.diverged_at - self.start
            old = tokenizer.decode(list(self.old or ()))
            new = tokenizer.decode(list(self.new[cut:]))
            # The token parts where the texts do: the first differing character, exactly.
            same = len(commonprefix([old, new]))
            self.where = locate(tokenizer, request, tokens, self.diverged_at, same)
            if excerpts:
                before = tokenizer.decode(list(self.new[:cut])) + new[:same]
                self.excerpts = {"before": before[-EXCERPT_CHARS:],
                                 "old": old[same:][:EXCERPT_CHARS],
                                 "new": new[same:][:EXCERPT_CHARS]}
        except Exception:  # an explanation must never fail a request
            self.where = None
        return self

    def header(self) -> str:
        """The `X-Mlxc-Prefix` value: reused=…/…; tier=…; diverged=…"""
        if self.diverged_at is None:
            diverged = "none (full reuse)" if self.reused else "none"
        elif self.where is not None:
            diverged = self.where.label()
        else:
            diverged = f"token {self.diverged_at}"
        return f"reused={self.reused}/{self.prompt_tokens}; tier={self.tier}; diverged={diverged}"

    def as_dict(self, excerpts: bool = True) -> dict[str, Any]:
        where = self.where
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens, "reused_tokens": self.reused, "tier": self.tier,
            "matched_tokens": self.matched, "full_reuse": self.full, "layout": self.layout,
            "diverged": None,
        }
        if self.diverged_at is not None:
            out["diverged"] = {
                "token": self.diverged_at,
                "part": where.part if where else None,
                "message": where.index if where else None,
                "role": where.role if where else None,
                "char": where.char if where else None,
                "label": where.label() if where else f"token {self.diverged_at}",
            }
            if excerpts and self.excerpts is not None:
                out["diverged"]["excerpt"] = self.excerpts
        return out


def tier_of(per_tier: dict[str, int]) -> str:
    used = [name for name in ("memory", "disk") if per_tier.get(name)]
    return "+".join(used) or "none"


def explain(tiers: Any, tokens: list[int], reused: int, per_tier: dict[str, int]) -> PrefixReport:
    """The report for a fetch that reused `reused` of `tokens`. Token comparison only."""
    report = PrefixReport(len(tokens), reused, tier_of(per_tier) if reused else "none")
    tree = getattr(tiers, "tree", None)
    if tree is None:  # whole states (or no tiers): reuse and tier only
        report.layout = "states" if tiers is not None else "none"
        report.matched = reused
        return report
    chain = tree.walk(tokens)
    if chain:
        last, used = chain[-1]
        matched = last.start + used
        old = _stored_after(tree, last, used)
    else:  # not even the first token: any stored prompt is a neighbour
        matched, old = 0, _stored_after(tree, None, 0)
    report.matched = matched
    if old and matched < len(tokens):
        report.diverged_at = matched
        report.start = max(0, matched - CONTEXT_TOKENS)
        report.new = array("i", tokens[report.start : matched + CONTEXT_TOKENS])
        report.old = array("i", old[:CONTEXT_TOKENS])
    return report


def _stored_after(tree: Any, block: Any, used: int) -> array:
    """Up to CONTEXT_TOKENS stored tokens that follow the first `used` tokens of `block` (or
    the root): the rest of it, then one stored block after another."""
    out = array("i", block.tokens[used : used + CONTEXT_TOKENS] if block else ())
    parent = tree.root if block is None else block.hash
    with tree.lock:
        while len(out) < CONTEXT_TOKENS and (block is None or used + len(out) >= len(block.tokens)):
            kids = tree._children(parent) or {}  # noqa: SLF001 - the tree's own index, read only
            block = next((tree.blocks[n] for names in kids.values() for n in names
                          if n in tree.blocks and tree.blocks[n].available), None)
            if block is None:
                break
            out.extend(block.tokens[: CONTEXT_TOKENS - len(out)])
            parent, used = block.hash, 0
    return out


# -- token -> message, role and character (only when asked) ---------------------------------


def _content(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # parts: their texts, as templates join them
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def locate(tokenizer: Any, request: Any, tokens: list[int], at: int, more: int = 0) -> Where:
    """Which part of the request holds the character `more` characters past the start of
    prompt token `at`: the prompt's text before it is decoded, and its length is found among
    the messages' contents as the template placed them (in order), or in the text the tools
    list adds (rendered by the template, or described in the system message)."""
    char = len(tokenizer.decode(tokens[:at])) + more
    if request is None or request.messages is None:
        return Where("prompt", char)
    from mlxc.engine.decode.tools import prompt_messages, template_messages

    messages, tools = prompt_messages(request, tokenizer)
    where = _in_rendered(tokenizer, messages, tools, char)
    own = template_messages(request.messages)
    if request.tools and tools is None and where.index is not None:  # tools described
        if len(messages) > len(own):  # in a system message of their own, first
            if where.index == 0:
                return Where("tools", where.char)
            where.index -= 1
        elif where.index == 0 and where.part == "message":  # after the system prompt
            system = len(_content(own[0])) + 2  # the "\n\n" before the description
            if where.char >= system:
                return Where("tools", where.char - system)
    return where


def _in_rendered(tokenizer: Any, messages: list[dict], tools: Any, char: int) -> Where:
    render = tokenizer.apply_chat_template
    text = render(messages, tools=tools, add_generation_prompt=True, tokenize=False)
    if tools:  # the tools' text: what rendering without them takes away
        bare = render(messages, tools=None, add_generation_prompt=True, tokenize=False)
        head = _common_prefix(text, bare)
        tail = _common_prefix(text[::-1], bare[::-1])
        end = len(text) - tail
        if head <= char < max(end, head + 1):
            return Where("tools", char - head)
    cursor = 0
    for i, message in enumerate(messages):
        content = _content(message)
        start = text.find(content, cursor) if content else -1
        if start < 0:
            continue
        if char < start:  # in the markup before this message (its role, its header)
            return Where("markup", 0, i, message.get("role"))
        if char <= start + len(content):
            return Where("message", char - start, i, message.get("role"))
        cursor = start + len(content)
    return Where("markup", 0, len(messages), None)  # the generation prompt's header


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    lo, hi = 0, n  # binary search on slice equality: C speed on long prompts
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo

"""Honour or refuse: which request fields each API accepts without using them (because they
do not change the answer), and the checks that refuse, with a 400 naming the parameter,
what this server cannot do. Any field not declared by a body model and not listed here is
refused (pipeline.check_fields): it might change the output, and the client should know.

The lists follow the official SDKs' request parameters (openai 3.x, anthropic 2.x)."""

from __future__ import annotations

from typing import Any

from mlxc.server.pipeline import Turn, refuse

# Billing, storage, routing, tracing and provider-side caching: none changes the text.
# (`store` on Responses is honoured by responses.py; here it only means "keep a log".)
_BOOKKEEPING = frozenset({
    "user", "metadata", "store", "service_tier", "safety_identifier", "prompt_cache_key",
    "prompt_cache_retention", "prompt_cache_options", "moderation",
})
OPENAI_IGNORED = _BOOKKEEPING | {
    # How hard a reasoning model thinks: these models do not reason, so every effort is met.
    "reasoning_effort",
    "modalities", "verbosity",  # checked by check_openai_sampling: only the defaults pass
}
RESPONSES_IGNORED = _BOOKKEEPING | {
    "include",  # extra output data (encrypted reasoning, logprobs of tools...): none exists here
    "truncation",  # "disabled" is what this server does; "auto" is refused by responses.py
    "background_options", "access_programs", "client_metadata",
}
ANTHROPIC_IGNORED = frozenset({
    "metadata", "service_tier", "cache_control",  # the prefix cache works without breakpoints
    "speed", "inference_geo", "diagnostics", "user_profile_id", "workspace_id", "betas",
    "billing_policy", "fallback_credit_token", "fallbacks", "thread",
})


def check_openai_sampling(body: Any) -> None:
    """The OpenAI fields that exist but cannot be honoured here."""
    if body.n not in (None, 1):
        raise refuse("n", "only n=1 is supported: ask again for another answer")
    if body.logit_bias:
        raise refuse("logit_bias", "logit_bias is not supported")
    if (getattr(body, "best_of", None) or 1) != 1:
        raise refuse("best_of", "only best_of=1 is supported")
    if getattr(body, "suffix", None):
        raise refuse("suffix", "suffix (fill-in-the-middle) is not supported")
    extra = body.model_extra or {}
    if extra.get("modalities") not in (None, ["text"]):
        raise refuse("modalities", "only text output is supported")
    if extra.get("verbosity") not in (None, "medium"):
        raise refuse("verbosity", "only the default verbosity is supported")


def tool_calls_for(turn: Turn, answer: Any) -> list[dict[str, Any]]:
    """The answer's tool calls, honouring OpenAI's `parallel_tool_calls: false` and
    Anthropic's `tool_choice.disable_parallel_tool_use` (at most one call)."""
    choice = getattr(turn.body, "tool_choice", None)
    if getattr(turn.body, "parallel_tool_calls", None) is False or (
        isinstance(choice, dict) and choice.get("disable_parallel_tool_use")
    ):
        return answer.tool_calls[:1]
    return answer.tool_calls


def check_anthropic(body: Any) -> None:
    """Anthropic fields that exist but cannot be honoured here."""
    extra = body.model_extra or {}
    for name in ("container", "mcp_servers", "compaction"):
        if extra.get(name):
            raise refuse(name, f"{name} is not supported by this server")
    edits = (extra.get("context_management") or {}).get("edits") or []
    for edit in edits:
        # Thinking blocks never reach the model here, so clearing them is always done.
        if not str(edit.get("type", "")).startswith("clear_thinking"):
            raise refuse("context_management",
                          f"context edit {edit.get('type')!r} is not supported")

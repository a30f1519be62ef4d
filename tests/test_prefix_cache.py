"""The prefix (KV) cache: reusing a state never changes a greedy answer (from memory, from disk
after a restart or a kill -9), bad files are skipped, models never share states, budgets hold.

Every comparison is against a cold prefill of the same prompt by an engine with the prefix
cache switched off. Tiny random models keep this fast; the real SmolLM2 runs when present.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import prefix_helpers as helpers
import pytest
from conftest import let_go_of_stopped_engines
from prefix_helpers import (
    OFF,
    SYSTEM,
    TEXT,
    ask,
    conversation,
    flush,
    service,
    state_files,
)

from mlxc.config import Settings
from mlxc.engine.kv.index import PrefixIndex
from mlxc.model.blas import load_optimised_blas
from mlxc.request import Answer, GenerationRequest
from mlxc.service import Service

# Before the fixtures import MLX, as the engine does: float32 runs on the fast BLAS then.
load_optimised_blas()

lively, sliding, cold = helpers.lively, helpers.sliding, helpers.cold  # the same fixtures


# -- memory ----------------------------------------------------------------------------------


def test_reuse_from_memory_equals_cold_at_several_prefix_lengths(lively, cold, tmp_path):
    with service(lively, tmp_path) as svc:
        first = ask(svc, conversation("What is the capital of France?"))
        assert first.usage.cached_tokens == 0
        assert first.text == cold(lively, conversation("What is the capital of France?"))
        # Turn 2 extends turn 1's state (prompt + answer): taken over, nothing copied.
        follow = conversation("What is the capital of France?", first.text, "And MLX?")
        second = ask(svc, follow)
        assert second.usage.cached_tokens >= first.usage.prompt_tokens
        assert second.text == cold(lively, follow)
        # The same system prompt with another question shares only the system prompt's state.
        other = ask(svc, conversation("Name a fox."))
        assert 100 < other.usage.cached_tokens < first.usage.prompt_tokens
        assert other.text == cold(lively, conversation("Name a fox."))
        # Raw prompts cut at several lengths reuse the stored text's state up to the cut.
        ask(svc, prompt=TEXT, max_tokens=4)
        reused = []
        for cut in (60, 400, 700, len(TEXT) - 1):
            prompt = TEXT[:cut] + " Paris?"
            result = ask(svc, prompt=prompt)
            reused.append(result.usage.cached_tokens)
            assert result.text == cold(lively, prompt=prompt), cut
        assert reused == sorted(reused) and reused[0] >= 8 and reused[-1] > 256
        stats = svc.prefix_stats()
        assert stats["memory_hits"] >= 6 and stats["memory_bytes"] > 0


def test_exact_repeat_prefills_only_the_last_token(lively, cold, tmp_path):
    messages = conversation("Tell me about Paris.")
    with service(lively, tmp_path) as svc:
        first = ask(svc, messages)
        again = ask(svc, messages)
    assert again.usage.cached_tokens == again.usage.prompt_tokens - 1
    assert again.text == first.text == cold(lively, messages)


def test_warm_prefix_caches_a_prompt_without_generating(lively, cold, tmp_path):
    messages = conversation("What is MLX?")
    with service(lively, tmp_path) as svc:
        cached = svc.warm_prefix(GenerationRequest(messages=messages))
        answer = ask(svc, messages)
    assert cached == answer.usage.prompt_tokens
    assert answer.usage.cached_tokens == cached - 1
    assert answer.text == cold(lively, messages)


# -- disk ------------------------------------------------------------------------------------


def test_follow_up_after_a_restart_is_served_from_disk(lively, cold, tmp_path):
    question = "What is the capital of France?"
    with service(lively, tmp_path) as svc:
        first = ask(svc, conversation(question))
    follow = conversation(question, first.text, "Why?")
    with service(lively, tmp_path) as svc:
        second = ask(svc, follow)
        exact = ask(svc, conversation("What is the capital of France?"))
        stats = svc.prefix_stats()
    assert second.usage.cached_tokens >= first.usage.prompt_tokens
    assert second.text == cold(lively, follow)
    assert exact.text == first.text
    assert stats["disk_hits"] == 1 and stats["disk_entries"] >= 1


def test_a_kill_9_after_an_answer_keeps_its_state(lively, cold, tmp_path):
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from prefix_helpers import ask, conversation, service
        with service(Path({str(lively)!r}), Path({str(tmp_path)!r})) as svc:
            text = ask(svc, conversation("Why?")).text
            svc.engine().prompt_cache.flush()
            print(text, flush=True)
            time.sleep(120)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        first = child.stdout.readline().rstrip("\n")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(30)
    follow = conversation("Why?", first, "Are you sure?")
    with service(lively, tmp_path) as svc:
        second = ask(svc, follow)
    assert second.usage.cached_tokens > 100
    assert second.text == cold(lively, follow)


# -- budgets ---------------------------------------------------------------------------------


def test_memory_and_disk_budgets_are_honoured(lively, tmp_path):
    memory, disk = 600_000, 700_000
    with service(lively, tmp_path, prefix_memory_bytes=memory, prefix_disk_bytes=disk) as svc:
        for i in range(5):
            ask(svc, prompt=f"{i} {TEXT}", max_tokens=4)
            flush(svc)
            stats = svc.prefix_stats()
            assert 0 < stats["memory_bytes"] <= memory
            assert 0 < stats["disk_bytes"] <= disk
        assert stats["bytes_written"] > disk  # so something was evicted
    files = state_files(tmp_path)
    assert len(files) == stats["disk_entries"]
    index = stats["index_bytes"]  # the budget counts the index's own files (and WAL) too
    assert index > 0 and sum(f.stat().st_size for f in files) + index == stats["disk_bytes"]
    with service(lively, tmp_path / "tiny", prefix_disk_bytes=10_000) as svc:
        ask(svc, prompt=TEXT, max_tokens=4)  # its state is larger than the whole budget
    assert state_files(tmp_path / "tiny") == []


# -- caches that cannot be trimmed -----------------------------------------------------------


def test_untrimmable_cache_reuses_states_at_message_boundaries(sliding, cold, tmp_path):
    question, n = "What is the capital of France?", 6  # an answer that re-tokenizes the same
    with service(sliding, tmp_path) as svc:
        first = ask(svc, conversation(question), max_tokens=n)
        assert svc.prefix_stats()["trimmable"] is False
        follow = conversation(question, first.text, "And MLX?")
        second = ask(svc, follow, max_tokens=n)  # from the state after turn 1's answer
        again = ask(svc, conversation(question), max_tokens=n)  # end-of-conversation boundary
        other = ask(svc, conversation("Name a fox."), max_tokens=n)  # end-of-system boundary
    # The batch feeds every token it hands out, the last one (cut by max_tokens) too.
    assert second.usage.cached_tokens == first.usage.prompt_tokens + n
    assert second.text == cold(sliding, follow, max_tokens=n)
    assert 0 < first.usage.prompt_tokens - again.usage.cached_tokens <= 10  # the answer header
    assert again.text == first.text == cold(sliding, conversation(question), max_tokens=n)
    assert 100 < other.usage.cached_tokens < first.usage.prompt_tokens
    assert other.text == cold(sliding, conversation("Name a fox."), max_tokens=n)
    follow2 = conversation(question, first.text, "And MLX?", second.text, "Sure?")
    with service(sliding, tmp_path) as svc:  # and from disk after a restart
        third = ask(svc, follow2, max_tokens=n)
        assert svc.prefix_stats()["disk_hits"] == 1
    # Turn 2's answer does not re-tokenize the same: the boundary before it serves.
    assert third.usage.cached_tokens >= second.usage.prompt_tokens - 10
    assert third.text == cold(sliding, follow2, max_tokens=n)


def test_untrimmable_cache_keeps_boundaries_in_memory_alone(sliding, cold, tmp_path):
    with service(sliding, tmp_path, prefix_disk_bytes=0) as svc:  # the memory tier starts empty
        ask(svc, conversation("What is the capital of France?"), max_tokens=6)
        other = ask(svc, conversation("Name a fox."), max_tokens=6)  # end-of-system boundary
    assert other.usage.cached_tokens > 100
    assert other.text == cold(sliding, conversation("Name a fox."), max_tokens=6)


def test_clear_empties_both_tiers(lively, tmp_path):
    with service(lively, tmp_path) as svc:
        ask(svc, conversation("Why?"))
    index = PrefixIndex(tmp_path / "prefix")
    count = index.count()
    assert count == len(state_files(tmp_path)) >= 1 and index.counters()["misses"] == 1
    assert index.clear() == count and state_files(tmp_path) == []
    assert index.counters()["bytes_written"] == 0
    index.close()


# -- command line ----------------------------------------------------------------------------


def _stats_without_mlx(env) -> dict:
    from conftest import run_mlxc_light

    stats, heavy = run_mlxc_light("cache", "stats", "--json", env=env)
    assert heavy == []
    return stats


def test_ask_continue_reuses_the_conversation_and_cache_commands_see_it(mlxc_env):
    from conftest import run_mlxc

    def ask_json(*args):
        result = run_mlxc("ask", *args, "--json", "--max-tokens", "6", env=mlxc_env)
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    first = ask_json("What is MLX?", "-s", SYSTEM)
    follow = ask_json("-c", "And Paris?")
    assert follow["usage"]["prompt_tokens"] > first["usage"]["prompt_tokens"] + 6
    stats = _stats_without_mlx(mlxc_env)
    assert stats["prefix"]["disk_hits"] >= 1 and stats["prefix"]["tokens_reused"] > 100
    assert stats["prefix"]["disk_entries"] >= 1 and stats["cached_items"] == 2
    cleared = run_mlxc("cache", "clear", "--prefix-only", "-y", env=mlxc_env)
    assert cleared.returncode == 0 and "prefix states" in cleared.stdout
    stats = _stats_without_mlx(mlxc_env)
    assert stats["prefix"]["disk_entries"] == 0 and stats["prefix"]["hits"] == 0
    assert stats["cached_items"] == 2
    assert follow["key"] != ask_json("And Paris?")["key"]  # the history is in the request


# -- the real default model ------------------------------------------------------------------


@pytest.mark.smollm
def test_smollm2_follow_up_from_memory_and_disk_equals_cold(tmp_path):
    from mlxc.config import load_settings
    from mlxc.model.refs import ModelError, prepare_model, resolve_model

    base = load_settings()
    try:
        prepare_model(resolve_model("default", base))
    except ModelError as exc:
        pytest.skip(f"the default model is not available: {exc}")

    def run(cache: Path, *conversations, **overrides) -> list[Answer]:
        settings = Settings(
            models_dir=base.models_dir, cache_dir=cache, cache_policy="off", **overrides
        )
        svc = Service(settings)
        try:
            return [ask(svc, messages, max_tokens=8) for messages in conversations]
        finally:
            svc.close()
            let_go_of_stopped_engines()

    system = "You are a concise assistant. Answer in one short sentence. " * 12
    turn1 = [{"role": "system", "content": system}, {"role": "user", "content": "Capital of Peru?"}]
    [first] = run(tmp_path / "c", turn1)

    def follow(question: str) -> list[dict]:
        return turn1 + [
            {"role": "assistant", "content": first.text},
            {"role": "user", "content": question},
        ]

    # A new engine: turn 2 comes from disk, then a sibling question from memory.
    from_disk, from_memory = run(tmp_path / "c", follow("And of Chile?"), follow("And Spain?"))
    cold = run(tmp_path / "cold", follow("And of Chile?"), follow("And Spain?"), **OFF)
    assert from_disk.usage.cached_tokens >= first.usage.prompt_tokens
    assert from_memory.usage.cached_tokens >= first.usage.prompt_tokens
    assert [from_disk.text, from_memory.text] == [a.text for a in cold]

"""Time to first token of a follow-up turn: cold, from the prefix cache in memory, from disk
after a clean restart, and from disk after the process was killed with SIGKILL.

The conversation: a ~500-token system prompt, a question and its answer (turn 1, up to
--answer-tokens, 256 by default: a common client limit, which these questions reach), then a
follow-up that adds ~40 tokens (turn 2, ~820 tokens in all). Each case runs in its own process
on its own cache folder (response cache off, so every turn is generated); a restart case writes
turn 1 in one process and times turn 2 in the next. Each process warms the model up first and
finishes its idle work (the next turn's opening, as `mlxc serve` does) before it stops; in
the memory case turn 2 also waits for it, as when a person reads the answer first.

The ratio depends on the shape: a prefill costs at least linear time in its tokens, so reusing
all but n of N tokens cannot go far below n/N (printed as "floor"). --peer also times the same
conversations on mlx-lm's own server in the same run (it runs the model as shipped: compare
with --dtype keep).

    python benchmarks/prefix_follow_up.py            # the default model and dtype
    python benchmarks/prefix_follow_up.py --json --reps 3
    python benchmarks/prefix_follow_up.py --dtype keep --peer --reps 1
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = {"memory": 0.05, "disk_restart": 0.06, "disk_sigkill": 0.06}
RULES = [
    "Read the whole file before you change it, and keep each change as small as the task allows.",
    "Explain what you will do in one sentence, then do it; do not ask for permission twice.",
    "Prefer the standard library; add a dependency only when it saves real work and is common.",
    "Run the tests after every change, and say which ones you ran and what they printed.",
    "Never print secrets, tokens or passwords, even when a file you read contains them.",
    "When a command fails, read its error message, fix the cause, and try once more at most.",
    "Write comments that say why the code is as it is, never what each line already says.",
    "Keep functions short, name them after what they return, and avoid global state.",
]
QUESTIONS = [  # each answered at length by the default model (250-500+ tokens)
    "What does a compiler do?",
    "How does a hash table work?",
    "What is a race condition?",
    "How does garbage collection work?",
    "What is recursion?",
]
FOLLOW_UP = (
    "Thanks. Now explain that again for a ten year old child, in two short sentences, "
    "and end with one surprising fact about it that most adults do not know."
)


def system_prompt(tokenizer, target: int = 500) -> str:
    """A coding-agent style system prompt of about `target` tokens."""
    lines = ["You are a careful coding assistant working in the user's repository."]
    i = 0
    while len(tokenizer.encode(" ".join(lines))) < target:
        lines.append(f"Rule {i + 1}: {RULES[i % len(RULES)]}")
        i += 1
    return " ".join(lines)


def make_service(cache_dir: Path, model: str | None, dtype: str | None, prefix: bool):
    from mlxc.config import load_settings
    from mlxc.service import Service

    overrides = {"cache_dir": cache_dir, "cache_policy": "off", "dtype": dtype, "model": model,
                 "next_turn_prefill": True}  # as `mlxc serve` runs
    settings = load_settings().with_overrides(**overrides)
    if not prefix:
        settings = settings.with_overrides(prefix_memory_bytes=0, prefix_disk_bytes=0)
    return Service(settings)


def timed(service, messages: list[dict], max_tokens: int):
    """(seconds to the first token, the answer), measured around the whole request."""
    from mlxc.request import GenerationRequest
    from mlxc.stream import Failed

    started = time.perf_counter()
    reply = service.start(GenerationRequest(messages=messages, max_tokens=max_tokens))
    first = None
    for event in reply.events():
        first = first or time.perf_counter()
        if isinstance(event, Failed):
            raise event.error
    return first - started, reply.result()


def turn1(system: str, i: int) -> list[dict]:
    question = QUESTIONS[i % len(QUESTIONS)]
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def turn2(system: str, i: int, answer: str) -> list[dict]:
    return turn1(system, i) + [
        {"role": "assistant", "content": answer},
        {"role": "user", "content": FOLLOW_UP},
    ]


def phase(args) -> None:
    """One process: write turn 1 of each conversation and/or time turn 2."""
    service = make_service(Path(args.cache_dir), args.model, args.dtype, args.phase != "cold")
    engine = service.engine()
    engine.wait_loaded()
    system = system_prompt(engine.tokenizer)
    answers = json.loads(args.answers) if args.answers else {}
    timed(service, [{"role": "user", "content": "Say hello."}], 4)  # warm-up, not measured
    out: dict = {"ttft": [], "reused": [], "prompt_tokens": [], "texts": [], "answers": {}}
    for i in range(args.reps):
        if args.phase in ("cold", "memory", "write"):
            _, first = timed(service, turn1(system, i), args.answer_tokens)
            engine.wait_idle()  # turn 2 comes once the answer is read, not at once
            answers[str(i)] = first.text
            out["answers"][str(i)] = first.text
        if args.phase == "write":
            continue
        seconds, second = timed(service, turn2(system, i, answers[str(i)]), 8)
        out["ttft"].append(seconds)
        out["reused"].append(second.usage.cached_tokens)
        out["prompt_tokens"].append(second.usage.prompt_tokens)
        out["texts"].append(second.text)
    engine.wait_idle()  # its idle work done, as a server's would be
    # Blocks reach the disk on a writer thread, milliseconds after the answer: a kill within
    # them loses that turn's new blocks (never anything before). The kill case waits for them.
    if getattr(engine, "prompt_cache", None) is not None and hasattr(engine.prompt_cache, "flush"):
        engine.prompt_cache.flush()
    out["prefix"] = service.prefix_stats()
    out["dtype"] = engine.dtype
    out["system_tokens"] = len(engine.tokenizer.encode(system))
    out["system"] = system
    out["folder"] = str(engine.ref.folder)
    print(json.dumps(out), flush=True)
    if args.hold:  # wait to be killed: nothing after the answers is needed for the state
        time.sleep(3600)
    service.close()


def child(args, phase_name: str, cache_dir: Path, answers=None, kill: bool = False) -> dict:
    cmd = [
        sys.executable, __file__, "--phase", phase_name, "--cache-dir", str(cache_dir),
        "--reps", str(args.reps), "--answer-tokens", str(args.answer_tokens),
    ]
    cmd += ["--model", args.model] if args.model else []
    cmd += ["--dtype", args.dtype] if args.dtype else []
    cmd += ["--answers", json.dumps(answers)] if answers else []
    cmd += ["--hold"] if kill else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    if kill:
        proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=3600)
    if not line:
        raise SystemExit(f"phase {phase_name} failed (exit {proc.returncode})")
    return json.loads(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="default: mlxc's default model (MLXC_MODEL)")
    parser.add_argument("--dtype", help="default: mlxc's default dtype (MLXC_DTYPE)")
    parser.add_argument("--reps", type=int, default=3, help="conversations timed per case")
    parser.add_argument("--answer-tokens", type=int, default=256, help="turn 1 answer limit")
    parser.add_argument("--peer", action="store_true", help="also time mlx_lm.server")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--memory-only", action="store_true",
                        help="time only the memory case (and cold): fewer processes")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--answers", help=argparse.SUPPRESS)
    parser.add_argument("--hold", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        return phase(args)

    with tempfile.TemporaryDirectory(prefix="mlxc-prefix-bench-") as tmp:
        root = Path(tmp)
        cold = child(args, "cold", root / "cold")
        cases = {"memory": child(args, "memory", root / "memory")}
        if not args.memory_only:
            written = child(args, "write", root / "restart")
            cases["disk_restart"] = child(args, "disk", root / "restart", written["answers"])
            doomed = child(args, "write", root / "killed", kill=True)
            cases["disk_sigkill"] = child(args, "disk", root / "killed", doomed["answers"])
    peer = None
    if args.peer:
        from mlx_lm_peer import follow_up_ttft

        system = cold["system"]
        peer = follow_up_ttft(
            cold["folder"], args.reps, args.answer_tokens,
            lambda i: turn1(system, i), lambda i, answer: turn2(system, i, answer),
        )
    report(args, cold, cases, peer)


def report(args, cold: dict, cases: dict, peer: dict | None) -> None:
    base = statistics.median(cold["ttft"])
    result = {
        "model": args.model or "default",
        "dtype": cold["dtype"],
        "system_prompt_tokens": cold["system_tokens"],
        "turn2_prompt_tokens": cold["prompt_tokens"][0],
        "reps": args.reps,
        "cold_ttft_s": round(base, 4),
        "cases": {},
    }
    for name, case in cases.items():
        ttft = statistics.median(case["ttft"])
        result["cases"][name] = {
            "ttft_s": round(ttft, 4),
            "ratio": round(ttft / base, 4),
            "target": TARGETS[name],
            "met": ttft / base <= TARGETS[name],
            "new_tokens": [
                p - r for p, r in zip(case["prompt_tokens"], case["reused"], strict=True)
            ],
            "same_answer_as_cold": case["texts"] == cold["texts"],
        }
    memory = result["cases"]["memory"]
    floor = statistics.median(memory["new_tokens"]) / result["turn2_prompt_tokens"]
    result["floor"] = round(floor, 4)
    if peer is not None:
        peer_cold = statistics.median(peer["cold"])
        result["peer"] = {
            "name": "mlx_lm.server (model as shipped)",
            "cold_ttft_s": round(peer_cold, 4),
            "memory_ttft_s": round(statistics.median(peer["memory"]), 4),
            "memory_ratio": round(statistics.median(peer["memory"]) / peer_cold, 4),
            "same_answer_as_cold": peer["texts"]["memory"] == peer["texts"]["cold"],
        }
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['model']} ({result['dtype']}): system prompt {result['system_prompt_tokens']}"
          f" tokens, turn 2 {result['turn2_prompt_tokens']} tokens, median of {args.reps}")
    print(f"  {'cold':<14} {base * 1000:8.1f} ms   1.000   (floor: new/all tokens = "
          f"{result['floor']:.3f})")
    for name, row in result["cases"].items():
        print(f"  {name:<14} {row['ttft_s'] * 1000:8.1f} ms   {row['ratio']:.3f}  "
              f"(target {row['target']}: {'met' if row['met'] else 'MISSED'}; "
              f"new tokens {row['new_tokens']}; same answer: {row['same_answer_as_cold']})")
    if peer := result.get("peer"):
        print(f"  peer, {peer['name']}: cold {peer['cold_ttft_s'] * 1000:.1f} ms, memory "
              f"{peer['memory_ttft_s'] * 1000:.1f} ms, ratio {peer['memory_ratio']:.3f} "
              f"(same answer: {peer['same_answer_as_cold']})")


if __name__ == "__main__":
    main()

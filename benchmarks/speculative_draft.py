"""benchmarks/speculative.py --draft-model: single streams of the code-edit and chat requests
with speculation off, auto without a draft model, `--speculate draft` and auto with the draft
model, and mlx_lm.server plain and with the same draft model (draft_peer.py: both servers run
the while), all taken in turns request by request. Greedy: answers are compared with off's."""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from draft_peer import in_child  # noqa: E402


def draft_folder(spec: str, model: Path) -> str:
    """A folder for `spec`: a path as given, `self` (the model), or `layers:0-3,24-29` (a draft
    cut from the model, tests/draft_maker.py)."""
    if spec == "self":
        return str(model)
    if not spec.startswith("layers:"):
        return spec
    layers: list[int] = []
    for part in spec.removeprefix("layers:").split(","):
        first, _, last = part.partition("-")
        layers += list(range(int(first), int(last or first) + 1))
    folder = Path(tempfile.mkdtemp()) / "draft"
    in_child("from draft_maker import layers_copy; layers_copy(Path(args[0]), Path(args[1]), "
             "[int(v) for v in args[2].split(',')])", str(model), str(folder),
             ",".join(map(str, layers)))
    return str(folder)


def with_draft_model(args: Any, run: Any, edits: list, chats: list,
                     speculation: dict[str, Any]) -> None:
    """`run`: speculative.py's; `speculation`: where it leaves each engine's figures."""
    from mlxc.config import load_settings
    from mlxc.model.refs import prepare_model, resolve_model

    settings = load_settings()
    model = prepare_model(resolve_model(settings.model, settings))
    draft = draft_folder(args.draft_model, model)
    requests = edits + chats
    n = len(edits)
    plans = {"off": ("off", requests), "auto": ("auto", requests),
             "draft": ("draft", requests), "auto+draft": ("auto", requests)}
    if args.no_peer:
        peers = nullcontext({})
    else:
        from draft_peer import peer_engines

        peers = peer_engines(str(model), draft, args.num_draft)
    with peers as engines:
        plans |= {name: ("peer", requests) for name in engines}
        results = run(plans, args.rounds, drafts={"draft": draft, "auto+draft": draft},
                      engines=engines)

    report: dict[str, Any] = {"draft_model": args.draft_model, "modes": {}}
    off = [a.text for a, _ in results["off"]]
    for name, pairs in results.items():
        answers = [a for a, _ in pairs]
        speeds = [s for _, s in pairs]
        row = report["modes"][name] = {
            "edit_tok_s": statistics.median(speeds[:n]),
            "chat_tok_s": statistics.median(speeds[n:]),
            "identical": sum(a.text == t for a, t in zip(answers, off, strict=True)),
        }
        if not name.startswith("mlx_lm"):
            row["accepted/drafted"] = [(a.usage.accepted_tokens, a.usage.drafted_tokens)
                                       for a in answers]
            row["speculation"] = speculation.get(name)
    modes = report["modes"]
    for name, row in modes.items():
        base = modes["mlx_lm.server plain" if name.startswith("mlx_lm") else "off"]
        row["edit_x"] = round(row["edit_tok_s"] / base["edit_tok_s"], 3)
        row["chat_x"] = round(row["chat_tok_s"] / base["chat_tok_s"], 3)
        row["edit_x_mlxc_off"] = round(row["edit_tok_s"] / modes["off"]["edit_tok_s"], 3)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    print(f"draft model {args.draft_model}; tok/s medians (code edit of {n}, chat of "
          f"{len(chats)}), ratio to its own plain run; identical to mlxc off, of "
          f"{len(requests)}")
    for name, row in modes.items():
        print(f"  {name:22} edit {row['edit_tok_s']:6.1f} ({row['edit_x']:.2f}x)  chat "
              f"{row['chat_tok_s']:6.1f} ({row['chat_x']:.2f}x)  identical {row['identical']}"
              + (f"  accepted/drafted {row['accepted/drafted']}" if "accepted/drafted" in row
                 else ""))
        if spec := row.get("speculation"):
            print(f"    by source {spec['sources']}; draft model {spec['draft_model']}")

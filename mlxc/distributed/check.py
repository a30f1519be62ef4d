"""Greedy answers of a sharded model, for comparing with one process (tests, docs):

  mlx.launch -n 2 --backend ring -- python -m mlxc.distributed.check FOLDER prompts.json out.json
  python -m mlxc.distributed.check FOLDER prompts.json one.json        # the same, one process

prompts.json is a list of user messages; rank 0 writes {world, layout, answers: [{tokens,
gaps, prefill_s, decode_s}]} to out.json."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlxc.distributed.check")
    parser.add_argument("model", type=Path)
    parser.add_argument("prompts", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--parallel", choices=("tensor", "pipeline", "auto"), default="auto")
    parser.add_argument("--max-tokens", type=int, default=16)
    args = parser.parse_args(argv)

    from mlxc.model.blas import load_optimised_blas  # before MLX: the fast BLAS

    load_optimised_blas()
    from mlxc.distributed.mirror import serve_jobs
    from mlxc.distributed.shard import load_shard
    from mlxc.distributed.world import join

    group, world = join()
    model, tokenizer, layout = load_shard(args.model, group, args.parallel)
    jobs = None
    if world.rank == 0:
        jobs = [{"prompt": tokenizer.apply_chat_template(
                    [{"role": "user", "content": text}], add_generation_prompt=True),
                 "max_tokens": args.max_tokens}
                for text in json.loads(args.prompts.read_text())]
    results = serve_jobs(group, model, set(tokenizer.eos_token_ids), jobs)
    if world.rank == 0:
        args.out.write_text(json.dumps({"world": world.describe(), "layout": layout,
                                        "answers": [asdict(r) for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

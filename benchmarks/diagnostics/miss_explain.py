"""What explaining a miss costs the engine thread (issue 27 target: ≤ 0.2 ms a request): the
token comparison of engine/kv/divergence.py `explain` on a 20,000-token prompt stored in
256-token blocks that parts at token 15,000 — one more walk of the block tree. Best of 5
repeats of 200 calls.

    python benchmarks/diagnostics/miss_explain.py [--tokens 20000] [--block 256]
"""

from __future__ import annotations

import argparse
import timeit

from mlxc.engine.kv.blocks import Block, BlockTree, chain_hash, token_array
from mlxc.engine.kv.divergence import explain


class Tiers:
    """A block tree holding `tokens` as the prefix cache stores a turn (the part of the tiers
    `explain` reads)."""

    def __init__(self, tokens: list[int], size: int) -> None:
        self.tree = BlockTree("root", 1 << 30)
        parent = self.tree.root
        for start in range(0, len(tokens), size):
            chunk = tokens[start : start + size]
            name = chain_hash(parent, chunk)
            self.tree.add(Block(name, parent, start, token_array(chunk), on_disk=True))
            parent = name


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=20_000)
    parser.add_argument("--block", type=int, default=256)
    args = parser.parse_args()
    stored = [(i * 7919) % 50000 for i in range(args.tokens)]
    at = args.tokens * 3 // 4
    tokens = token_array([*stored[:at], 1, *stored[at + 1 :]])
    tiers = Tiers(stored, args.block)
    assert explain(tiers, tokens, at, {"memory": at}).diverged_at == at
    runs = 200
    seconds = min(timeit.repeat(lambda: explain(tiers, tokens, at, {"memory": at}),
                                number=runs, repeat=5)) / runs
    print(f"explain on a {args.tokens}-token prompt parting at {at}: {seconds * 1e3:.3f} ms")


if __name__ == "__main__":
    main()

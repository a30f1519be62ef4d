"""Greedy decoding through a BatchGenerator, with sequences joining a running batch: for the
tests that compare one batched decode with another."""

from __future__ import annotations


def decode(forward, prompts, max_tokens, join=(), join_after=3, kind=None, prefill_step=2048):
    """Greedy tokens of each prompt, decoded together by `kind` (mlx-lm's BatchGenerator by
    default) calling `forward`; `join` (prompt, max_tokens) pairs are inserted `join_after`
    steps in."""
    from mlx_lm.generate import BatchGenerator

    batch = (kind or BatchGenerator)(forward, completion_batch_size=8, prefill_batch_size=8,
                                     prefill_step_size=prefill_step)
    uids = batch.insert(prompts, max_tokens=max_tokens)
    out: dict[int, list[int]] = {u: [] for u in uids}
    steps = 0
    while responses := batch.next_generated():
        steps += 1
        if steps == join_after and join:
            more = batch.insert([p for p, _ in join], max_tokens=[n for _, n in join])
            out.update({u: [] for u in more})
            uids += more
        for r in responses:
            out[r.uid].append(r.token)
    batch.close()
    return [out[u] for u in uids]

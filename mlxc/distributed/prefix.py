"""Prefix (KV) reuse on a sharded model: every rank keeps its own share of each block (its
heads, or its layers), under block keys that name the world size, the layout and the rank, so
a rank's blocks are found only by the same layout (and never by a one-process server).

Rank 0 decides what is fetched and stored; each rank looks up its own blocks, and the ranks
take the shortest prefix that all of them hold (a block may be evicted on one rank, or not yet
written to its disk), trimmed to it, so every rank's cache holds the same tokens. Block caches
only (full attention): whole states could not be trimmed to agree, so they are not kept."""

from __future__ import annotations

from typing import Any

from mlxc.engine.kv.cache import PrefixCache


def shard_fingerprint(fingerprint: str | None, role: Any) -> str | None:
    """The block chains' root for this rank: the model, and how it is split and where."""
    if fingerprint is None:
        return None
    world = role.world
    return f"{fingerprint}/rank {world.rank} of {world.size}, {role.layout} parallel"


def agree(group: Any, value: int) -> int:
    """The smallest `value` of all ranks (every rank calls it together)."""
    import mlx.core as mx

    from mlxc.distributed.mirror import collective_stream

    mine = [0] * group.size()
    mine[group.rank()] = value
    every = mx.distributed.all_sum(mx.array(mine), group=group,
                                   stream=collective_stream()).tolist()
    return min(every)


def settle(model: Any, cache: list[Any], reused: int, agreed: int) -> list[Any]:
    """This rank's cache cut back to the `agreed` prefix (a fresh one for none)."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    if agreed == 0:
        return make_prompt_cache(model)
    if agreed < reused:
        trim_prompt_cache(cache, reused - agreed)
    return cache


class _AgreedTiers:
    """Rank 0's block tiers, whose `reuse` the other ranks do with it and agree on."""

    def __init__(self, tiers: Any, leader: Any, model: Any) -> None:
        self._tiers, self._leader, self._model = tiers, leader, model

    def reuse(self, tokens: Any) -> tuple[list[Any], int, dict[str, int]]:
        key = self._leader.share_fetch(list(tokens))
        with self._leader.log.quiet():  # every rank cuts its own cache alike
            cache, reused, per_tier = self._tiers.reuse(tokens)
            agreed = agree(self._leader.group, reused)
            cache = settle(self._model, cache, reused, agreed)
        self._leader.adopt(cache, key)
        memory = min(per_tier.get("memory", 0), agreed)
        return cache, agreed, {"memory": memory, "disk": agreed - memory}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tiers, name)


class LeadingPrefix(PrefixCache):
    """Rank 0's prefix cache: its fetches and stores done by every rank."""

    def __init__(self, role: Any, model: Any, tokenizer: Any, fingerprint: str | None,
                 settings: Any, step: int) -> None:
        super().__init__(model, tokenizer, shard_fingerprint(fingerprint, role), settings, step)
        self.leader = role.leader
        if not self.trimmable:
            self.tiers = None  # whole states cannot be cut back to what every rank holds
        elif self.tiers is not None:
            self.tiers = _AgreedTiers(self.tiers, self.leader, model)

    def store(self, tokens: list[int], cache: list[Any], kind: str = "assistant"
              ) -> list[int] | None:
        if self.tiers is None or not self.leader.share_store(cache, tokens):
            return None  # a cache the other ranks do not hold: nothing worth keeping alone
        with self.leader.log.quiet():  # a cut to `tokens` is done by every rank's own store
            return super().store(tokens, cache, kind)


def following_prefix(role: Any, model: Any, tokenizer: Any, fingerprint: str | None,
                     settings: Any, step: int) -> PrefixCache:
    """A follower's own prefix cache, in its own folder (cache_dir/ranks/N)."""
    rank = role.world.rank
    mine = settings.with_overrides(cache_dir=settings.cache_dir / "ranks" / str(rank))
    prefix = PrefixCache(model, tokenizer, shard_fingerprint(fingerprint, role), mine, step)
    if not prefix.trimmable:
        prefix.tiers = None
    return prefix

"""Memory-aware admission: a request is prefilled only when the KV cache it may grow to fits a
byte budget, so a long prompt or a large max_tokens never runs the machine out of memory.

- The cost of a token is measured, not guessed: the model runs one prefill chunk through a
  cache made by mlx-lm's `make_prompt_cache`, and each layer's bytes are read off the arrays
  it allocated. Layers that keep every token (KVCache, QuantizedKVCache) cost bytes per token;
  sliding-window layers (RotatingKVCache) stop growing at their window; recurrent layers
  (ArraysCache) cost a fixed size per sequence. Caches grow by blocks of 256 tokens, so one
  holds up to a block more than its tokens.
- Decoding sequences share one rectangular cache in mlx-lm's BatchGenerator (shorter ones are
  left-padded), so a batch is counted as (sequences) x (the longest one), not as a sum.
- A request needs prompt + max_tokens tokens, plus the working memory of its widest prefill
  chunk while it prefills (prompts of a burst prefill together: each its own), measured by
  the same probe: two whole chunks, since where attention is not fused (the CPU backend) a
  chunk holds every score, growing with the chunk squared (tiny model: 0.2 MB for 32 tokens,
  6.8 MB for 512) and with the context it attends to (+9 KB per token there); fused kernels
  measure no growth.

The limit (--max-kv-memory) defaults to what the device can use (Metal's recommended working
set, CUDA's total memory, else the system RAM) less the weights and a safety share. The
prefix cache's memory tier lives in the same memory, within its own budget: when what the
admitted sequences may reach, the weights, the tier and the safety share would pass what the
device can use, the tier drops its least recently used blocks first (they stay on disk).

Order: strictly first come, first served. A request that does not fit beside the running ones
waits at the head of the queue, and the requests behind it wait too, even small ones that
would fit: nothing overtakes it, so a large request is never starved by a stream of small
ones (the price: small requests queue behind it until enough running sequences finish). A
request that cannot fit even alone is refused at once (NotEnoughMemory, a 400 in each API's
shape) with what it needs, what is allowed and what to change.

Engine thread only, except `figures()`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlxc.config import private_dir
from mlxc.errors import NotEnoughMemory
from mlxc.sidecar import read_json, write_json

log = logging.getLogger("mlxc.engine")
STEP = 256  # mlx-lm's caches allocate in blocks of this many tokens
# Of the memory the device can use, the share kept out of the default KV budget (at least
# SAFETY_MIN): MLX's buffer cache, a state copied while it joins or leaves the batch, arrays
# outside the KV cache (sampling, logits), the CUDA context, and the error in the estimate.
# Metal's recommended working set already leaves the OS and other apps their part of RAM.
SAFETY_SHARE = 0.05
SAFETY_MIN = 512 << 20


class MemoryWait(Exception):
    """The request fits once running sequences finish: it keeps its place at the head."""


@dataclass(frozen=True)
class KVCost:
    """Bytes a sequence's cache takes, by kind of layer (measured by `measure`)."""

    per_token: float  # layers that keep every token
    windowed: tuple[tuple[float, int], ...] = ()  # (bytes per token, window) of rotating layers
    fixed: int = 0  # recurrent layers: the same whatever the length
    activations: int = 0  # a first prefill chunk's working memory beyond its KV
    per_context: float = 0.0  # and what a later chunk needs more per token it attends to
    chunk: int = STEP  # prefill chunk (tokens)

    def prefill_bytes(self, prompt: int) -> int:
        """Working memory of the prompt's last (widest) prefill chunk."""
        return int(self.activations + self.per_context * max(prompt - self.chunk, 0))

    def sequence_bytes(self, tokens: int) -> int:
        """One sequence's cache at `tokens` tokens, at most, as allocated: a cache grows by
        whole blocks past what it holds, so up to a block more than its tokens."""
        n = max(tokens, 1) + STEP
        # A rotating layer holds its window, plus a prefill chunk while it is fed one.
        rotating = sum(b * min(n, w + self.chunk) for b, w in self.windowed)
        return int(self.per_token * n + rotating + self.fixed)

    def batch_bytes(self, lengths: list[int]) -> int:
        """Sequences decoding together: mlx-lm's batch cache is one rectangle, every row as
        long as the longest sequence."""
        return len(lengths) * self.sequence_bytes(max(lengths)) if lengths else 0

    def longest_fitting(self, limit: int, prompt: int) -> int:
        """The most tokens a sequence with this prompt may reach within `limit` bytes."""
        lo, hi, prefill = 0, 1 << 34, self.prefill_bytes(prompt)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.sequence_bytes(mid) + prefill <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo


def _layers(cache: list[Any]) -> list[Any]:
    """Cache layers, with mlx-lm's CacheList (several caches in one layer) flattened."""
    out = []
    for layer in cache:
        inner = getattr(layer, "caches", None)
        out.extend(_layers(list(inner)) if isinstance(inner, (list, tuple)) else [layer])
    return out


def cache_cost(cache: list[Any]) -> KVCost:
    """The cost per token of a cache that has been fed at least one token: each layer's bytes
    over the positions it allocated (its keys' second-to-last axis)."""
    per_token, windowed, fixed = 0.0, [], 0
    for layer in _layers(cache):
        keys = getattr(layer, "keys", None)
        if keys is None:  # recurrent state (ArraysCache) or nothing yet: a fixed size
            fixed += int(layer.nbytes)
            continue
        first = keys[0] if isinstance(keys, (list, tuple)) else keys  # quantized: a triple
        allocated = int(first.shape[-2])
        cost = layer.nbytes / max(allocated, 1)
        window = getattr(layer, "max_size", None)
        if window:
            windowed.append((cost, int(window)))
        else:
            per_token += cost
    return KVCost(per_token, tuple(windowed), fixed)


def measure(model: Any, chunk: int, make_cache: Callable[[Any], list[Any]] | None = None
            ) -> KVCost:
    """Run two `chunk`-token prefill chunks through a fresh cache: the bytes each layer
    allocated give the cost per token; the peak above them, the activations of a first chunk
    and how much more the second needs for attending to twice as many tokens (nothing where
    attention is fused; the CPU backend holds every score)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = (make_cache or make_prompt_cache)(model)

    def prefill_chunk(cache: list[Any]) -> int:
        """Working memory of one chunk: its peak above what was there and what it added.
        Only the cache is evaluated, as in a prefill: the logits of every position are never
        computed (the last chunk's last position only, which is small)."""
        mx.synchronize()
        kv, before = _kv_bytes(cache), mx.get_active_memory()
        mx.reset_peak_memory()
        model(mx.array([[1] * chunk]), cache=cache)
        mx.eval([layer.state for layer in cache])
        return max(mx.get_peak_memory() - before - (_kv_bytes(cache) - kv), 0)

    first = prefill_chunk(cache)
    cost = cache_cost(cache)
    second = prefill_chunk(cache)
    del cache
    mx.clear_cache()
    return KVCost(cost.per_token, cost.windowed, cost.fixed, first,
                  max(second - first, 0) / chunk, chunk)


def measurement_file(folder: Path, fingerprint: str, chunk: int) -> Path:
    """Where a model's measured costs are kept: one file per model (its fingerprint says the
    weights and dtype), prefill chunk, MLX version and device."""
    import mlx.core as mx

    key = f"{fingerprint}\0{chunk}\0{mx.__version__}\0{mx.default_device()}"
    return folder / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"


def recall(path: Path | None, chunk: int) -> KVCost | None:
    """The costs measured by an earlier process; None if there are none (or not readable).
    The probe prefills two whole chunks: ~5 s on a 2-core CPU for SmolLM2-135M, as long as
    the rest of `mlxc ask`'s load, so it runs once per model, not once per process."""
    fields = read_json(path) if path else None
    try:
        cost = KVCost(
            float(fields["per_token"]),
            tuple((float(b), int(w)) for b, w in fields["windowed"]),
            int(fields["fixed"]), int(fields["activations"]), float(fields["per_context"]),
            int(fields["chunk"]))
    except (ValueError, TypeError, KeyError):
        return None
    return cost if cost.chunk == chunk and cost.per_token >= 0 else None


def remember(path: Path | None, cost: KVCost) -> KVCost:
    """Keep `cost` for the next process (its folder 0700, as every cache folder)."""
    if path is not None:
        try:
            private_dir(path.parent)  # an earlier version made it 0755
        except OSError:
            return cost  # not writable: measured again next time
        write_json(path, dataclasses.asdict(cost))
    return cost


def _kv_bytes(cache: list[Any]) -> int:
    return sum(int(layer.nbytes) for layer in _layers(cache))


def usable_memory() -> tuple[int, str]:
    """(bytes, where from): what MLX may use on this device."""
    import mlx.core as mx

    try:
        info = mx.device_info()
    except Exception:  # an older MLX: only the Metal module says
        info = {}
    for key, source in (("max_recommended_working_set_size", "Metal working set"),
                        ("total_memory", "GPU memory")):
        if int(info.get(key, 0) or 0) > 0:
            return int(info[key]), source
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "system RAM"
    except (ValueError, OSError, AttributeError):
        return 0, "unknown"


def safety(usable: int) -> int:
    return max(int(usable * SAFETY_SHARE), SAFETY_MIN) if usable > 0 else 0


def default_limit(usable: int, weights: int) -> int:
    """What the weights leave, less the safety share (half of what they leave, if that is
    less); 0, nothing limited, when nothing is known about the device or the weights alone
    fill it (the model runs from swap already: refusing every request would not help)."""
    left = usable - weights
    return max(left - safety(usable), left // 2, 0) if usable > 0 else 0


class MemoryGate:
    """Reservations of the sequences admitted (by their Generation, released when it is done:
    every way out of the engine ends it) against a byte limit."""

    def __init__(self, cost: KVCost | None, limit: int, usable: int = 0, source: str = "",
                 weights: int = 0, chosen: bool = False, prefix: Any = None) -> None:
        self.cost = cost
        self.limit = limit if cost is not None else 0  # 0: no limit
        self.usable, self.source, self.weights = usable, source, weights
        self.chosen = chosen  # set by --max-kv-memory rather than derived
        self.prefix = prefix  # the PrefixCache, whose memory tier gives way (memory_bytes, shed)
        self.shed = 0  # bytes the prefix cache's memory tier dropped to make room, ever
        self._lock = threading.Lock()
        self._held: dict[Any, tuple[int, int]] = {}  # generation -> (prompt, tokens it may reach)
        self._waiting: tuple[Any, tuple[int, int]] | None = None  # the head, told to wait
        self.waits = 0  # requests told to wait, ever

    @classmethod
    def for_model(cls, model: Any, chunk: int, limit: int | None, prefix: Any = None,
                  remembered: Path | None = None) -> MemoryGate:
        """Measured for a loaded model (or read from `remembered`, where an earlier process
        of the same model, chunk and MLX build wrote it); `limit` None derives it from the
        device."""
        import mlx.core as mx

        usable, source = usable_memory()
        weights = mx.get_active_memory()
        try:
            cost = recall(remembered, chunk) or remember(remembered, measure(model, chunk))
        except Exception as exc:  # a model mlx-lm cannot feed this way: admission as before
            log.warning("cannot measure the KV cache's size (%s); memory is not checked", exc)
            return cls(None, 0, usable, source, weights)
        chosen = limit is not None
        if limit is None:
            limit = default_limit(usable, weights)
            if not limit:
                log.warning("memory: the weights (%s) fill the %s (%s); requests are not "
                            "checked against memory", human(weights), source, human(usable))
        return cls(cost, limit, usable, source, weights, chosen, prefix)

    # -- admission -----------------------------------------------------------------------

    def admit(self, generation: Any, prompt_tokens: int, max_tokens: int) -> None:
        """Reserve room for a sequence, or raise NotEnoughMemory (never fits) or MemoryWait
        (fits once others finish)."""
        if not self.limit:
            return
        entry = (prompt_tokens, prompt_tokens + max_tokens)
        alone = self._need({}, entry)
        if alone > self.limit:
            self._waiting = None
            raise NotEnoughMemory(self._refusal(prompt_tokens, max_tokens, alone))
        with self._lock:
            self._prune()
            reserved = self._need(self._held, entry)
            if reserved > self.limit:
                self._waiting = (generation, entry)
                self.waits += 1
                raise MemoryWait
            self._held[generation] = entry
            self._waiting = None
        self._make_room(reserved)

    def _make_room(self, reserved: int) -> None:
        """Shrink the prefix cache's memory tier if the weights, the KV caches at their largest,
        the tier and the safety share would pass what the device can use."""
        if not self.usable or self.prefix is None:
            return
        tier = self.prefix.memory_bytes()
        over = self.weights + reserved + tier + safety(self.usable) - self.usable
        if over > 0 and tier > 0:
            freed = self.prefix.shed(over)
            self.shed += freed
            log.info("memory: the prefix cache's memory tier gave %s to running requests",
                     human(freed))

    def lets_in(self, head: tuple[Any, Any]) -> bool:
        """Whether the first waiting (request, generation) may be tried now: not while it
        waits for memory that is still taken (a cancelled one may go: it leaves at once)."""
        waiting = self._waiting
        if waiting is None or head[1] is not waiting[0] or head[1].cancelled.is_set():
            return True
        with self._lock:
            self._prune()
            return self._need(self._held, waiting[1]) <= self.limit

    def _need(self, held: dict[Any, tuple[int, int]], new: tuple[int, int] | None) -> int:
        """The batch of `held` (and `new`) at their longest, and the working memory of the
        prompts still prefilling (several prefill together in a burst); `new` prefills."""
        entries = [*held.values(), *([new] if new else [])]
        prefilling = [p for g, (p, _) in held.items()
                      if g.prompt_tokens_done < g.prompt_tokens_total]
        prefilling += [new[0]] if new else []
        return (self.cost.batch_bytes([n for _, n in entries])
                + sum(self.cost.prefill_bytes(p) for p in prefilling))

    def _prune(self) -> None:
        for generation in [g for g in self._held if g.done.is_set()]:
            del self._held[generation]

    def _refusal(self, prompt: int, max_tokens: int, need: int) -> str:
        room = self.cost.longest_fitting(self.limit, prompt) - prompt
        longest = self.cost.longest_fitting(self.limit, 1)
        how = "--max-kv-memory" if self.chosen else "the memory left beside the model"
        fix = (f"lower max_tokens to at most {room}" if room > 0 else
               f"keep prompt + max_tokens under {longest} tokens" if longest > 1 else
               "nothing fits this limit")
        return (
            f"this request may need {human(need)} of KV cache memory (a {prompt}-token prompt "
            f"+ max_tokens {max_tokens}, at {human(self.cost.per_token)} per token) but at "
            f"most {human(self.limit)} is allowed ({how}); {fix}"
            # A derived limit is what the device holds: raising it would trade a 400 for OOM.
            + (", or raise --max-kv-memory." if self.chosen else ".")
        )

    # -- figures -------------------------------------------------------------------------

    def figures(self) -> dict[str, Any]:
        """For /health's batch section (any thread)."""
        with self._lock:
            held = {g: e for g, e in self._held.items() if not g.done.is_set()}
        reserved = self._need(held, None) if self.cost else 0
        return {
            "kv_memory_limit_bytes": self.limit or None,
            "kv_memory_reserved_bytes": reserved if self.limit else None,
            "kv_bytes_per_token": round(self.cost.per_token) if self.cost else None,
            "memory_waits": self.waits,
            "prefix_memory_shed_bytes": self.shed,
            "device_memory_bytes": self.usable or None,
            "device_memory_source": self.source or None,
            "weights_bytes": self.weights,
        }

    def describe(self) -> str:
        """One line for `mlxc serve`'s start-up panel."""
        if not self.limit:
            why = ("--max-kv-memory off" if self.chosen else
                   "the KV cache's size could not be measured" if self.cost is None else
                   f"the weights, {human(self.weights)}, fill the {human(self.usable)} "
                   f"{self.source}" if self.usable else "the device's memory is unknown")
            return f"not checked ({why})"
        tokens = self.cost.longest_fitting(self.limit, 1)
        how = "--max-kv-memory" if self.chosen else (
            f"{human(self.usable)} {self.source} - {human(self.weights)} weights - "
            f"{human(safety(self.usable))} margin")
        return f"KV cache up to {human(self.limit)} ({how}): ~{tokens:,} tokens in one sequence"


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"

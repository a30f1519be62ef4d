"""A decode step built once per shape and replayed (`mx.compile`), for CUDA: the batch's, and a
lone sequence's (a batch of one row over mlx-lm's KVCache).

On the H200 a decode step is paced by the host: Python builds ~700 operations a step for a
3B model (~2.5 ms) before the GPU has work, and a batch of 4 cost ~1.5-2x a lone step
(`benchmarks/diagnostics/decode_step.py`). A compiled step replays its graph from C++ instead.

`mx.compile` needs the same shapes and no Python state that changes, and mlx-lm's
`BatchKVCache` grows by Python-int slices: its `_idx` moves every step. So the step runs
over stand-ins (`_Slot`) that write the new keys at an array index (a scatter) into
the cache's whole buffer, and attend over the buffer from each row's left padding to that
index. The buffers grow 256 positions at a time, so a batch retraces once per 256 tokens
and per batch size. The real caches take the new buffers after the call, so everything
else in `BatchGenerator` (joins, leaves, extracts, prefills) keeps mlx-lm's code.
"""

from __future__ import annotations

import sys
import time
from collections import OrderedDict
from typing import Any

from mlxc.engine.cuda import batch_attention, small_rows

STEP = 256  # positions a buffer grows by: mlx-lm's BatchKVCache.step
# Shapes (batch size x buffer length) kept compiled; the least recently used one is dropped
# (with its graph) past this, so a server that has run every batch size at every length
# holds a few, not hundreds. A batch meets a new shape once per STEP tokens at most.
KEPT_SHAPES = 16
# The first compiled step is checked against the model's own: a model that attends without
# its module's helper (mx.fast directly) would read the whole buffer, padding and all.
AGREE = 0.05  # largest gap of the logits allowed, relative to their largest (CPU: 0;
# a model attending over the whole buffer: 0.13-0.65 in the tests' models)


class _Slot:
    """One layer's cache as the traced step sees it: arrays only, written at `idx`."""

    def __init__(self, keys: Any, values: Any, offset: Any, left_padding: Any,
                 idx: Any) -> None:
        self.keys, self.values = keys, values
        self.offset, self.left_padding, self.idx = offset, left_padding, idx

    def update_and_fetch(self, keys: Any, values: Any) -> tuple[Any, Any]:
        # A scatter at idx, in place (the buffer is donated). Not slice_update at an array
        # index: MLX 0.32's CUDA kernel for it spans the whole buffer, 1.0-1.5 ms a step at
        # 4-8 rows on the H200 against 0.30-0.33 ms for the scatters (`step_kernels.py`).
        import mlx.core as mx

        at = mx.broadcast_to(self.idx.reshape(1, 1, 1, 1), keys.shape)
        self.keys = mx.put_along_axis(self.keys, at, keys, axis=2)
        self.values = mx.put_along_axis(self.values, at, values, axis=2)
        return self.keys, self.values

    def make_mask(self, *_: Any, **__: Any) -> None:
        return None  # the attention below bounds each row itself

    def visible(self, length: int) -> Any:
        """(B, 1, 1, length): the positions a row's new token attends to."""
        import mlx.core as mx

        positions = mx.arange(length)
        seen = (positions[None] >= self.left_padding[:, None]) & (positions[None] <= self.idx)
        return seen[:, None, None, :]


class CompiledDecode:
    """The model as `BatchGenerator` calls it: a decode step over mlx-lm's `BatchKVCache`
    runs compiled; every other call (prefill, other caches) goes to the model as it is."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self._module = sys.modules.get(type(model).__module__)
        # shape -> its compiled step: one mx.compile function each, so dropping one frees its graph
        self._shapes: OrderedDict[tuple, Any] = OrderedDict()
        self.failed: str | None = None  # why the compiled step is off, once a trace failed
        self.steps = 0  # decode steps it ran compiled
        self.lone_steps = 0  # of which a lone sequence's (one row over mlx-lm's KVCache)
        self.traces, self.trace_seconds = 0, 0.0  # shapes traced, and the time it took
        self.on = True  # off: every call goes to the model (a benchmark's A/B switch)
        self.checked = False  # the first compiled step was compared with the model's

    def __getattr__(self, name: str) -> Any:  # layers, make_cache, args: the model's
        return getattr(self.model, name)

    def __call__(self, inputs: Any, cache: Any = None, **kwargs: Any) -> Any:
        kind = None if kwargs or self.failed or not self.on else _decodes(inputs, cache)
        if kind is None:
            return self.model(inputs, cache=cache, **kwargs)
        import mlx.core as mx

        _make_room(cache, kind)
        first = cache[0]
        shape = (*inputs.shape, *first.keys.shape, first.keys.dtype)
        compiled = self._shapes.pop(shape, None)
        fresh = compiled is None
        if fresh:
            compiled, started = mx.compile(self._step), time.perf_counter()
        try:
            logits, keys, values = compiled(
                inputs, *_positions(first, kind),
                [c.keys for c in cache], [c.values for c in cache])
        except Exception as exc:  # a model the stand-ins do not fit: mlx-lm's step, always
            self.failed = f"{type(exc).__name__}: {exc}"
            return self.model(inputs, cache=cache)
        if not self.checked:
            self.checked = True
            want = self.model(inputs, cache=[_twin(c) for c in cache])
            gap = (mx.abs(logits - want).max() / mx.maximum(mx.abs(want).max(), 1e-6)).item()
            if not gap <= AGREE:  # NaN too
                self.failed = f"its first step's logits were {gap:.3g} off the model's"
                return self.model(inputs, cache=cache)
        if fresh:
            self.traces += 1
            self.trace_seconds += time.perf_counter() - started
        self._shapes[shape] = compiled  # now the most recently used
        if len(self._shapes) > KEPT_SHAPES:
            self._shapes.popitem(last=False)
        for c, k, v in zip(cache, keys, values, strict=True):
            c.keys, c.values = k, v
            c.offset = c.offset + 1  # BatchKVCache: an array per row; KVCache: an int
            if kind == "batch":
                c._idx += 1
        self.steps += 1
        if kind == "lone":
            self.lone_steps += 1
        return logits

    def figures(self) -> dict:
        """For /health: whether decode steps run compiled, and what tracing has cost."""
        return {"compiled_decode": {"steps": self.steps, "lone_steps": self.lone_steps,
                                    "traces": self.traces,
                                    "trace_seconds": round(self.trace_seconds, 3),
                                    "failed": self.failed}}

    def _step(self, inputs: Any, offset: Any, left_padding: Any, idx: Any, keys: list,
              values: list) -> tuple[Any, list, list]:
        """Traced once per shape: the model over stand-in caches (see the module's doc)."""
        slots = [_Slot(k, v, offset, left_padding, idx) for k, v in zip(keys, values, strict=True)]
        helper = getattr(self._module, "scaled_dot_product_attention", None)
        if helper is not None:
            self._module.scaled_dot_product_attention = _attention(helper)
        try:
            logits = self.model(inputs, cache=slots)
        finally:
            if helper is not None:
                self._module.scaled_dot_product_attention = helper
        return logits, [s.keys for s in slots], [s.values for s in slots]


def _attention(original: Any) -> Any:
    """The model module's attention helper, bounded by a `_Slot`'s rows: mlxc's kernel on
    CUDA (no mask), else MLX's attention with a mask."""

    def scaled_dot_product_attention(queries, keys, values, cache, scale, mask, sinks=None):
        if not isinstance(cache, _Slot):
            return original(queries, keys, values, cache=cache, scale=scale, mask=mask,
                            sinks=sinks)
        if sinks is None and small_rows.usable() and batch_attention.kernel_fits(queries, keys):
            return batch_attention.attend(queries, keys, values, cache.left_padding, scale,
                                          stop=cache.idx + 1)
        return original(queries, keys, values, cache=None, scale=scale,
                        mask=cache.visible(keys.shape[2]), sinks=sinks)

    return scaled_dot_product_attention


def _decodes(inputs: Any, cache: Any) -> str | None:
    """"batch": one new token per row over mlx-lm's BatchKVCache in every layer, already
    filled; "lone": one token of one sequence over mlx-lm's plain KVCache (the lone loop's
    step, engine/batch/lone.py); None: anything else (prefills, verify passes, other caches)."""
    from mlx_lm.models.cache import BatchKVCache, KVCache

    if not (inputs.ndim == 2 and inputs.shape[1] == 1 and isinstance(cache, list) and cache):
        return None
    if all(type(c) is BatchKVCache and c.keys is not None and c._right_padding is None
           for c in cache):
        return "batch"
    if inputs.shape[0] == 1 and all(type(c) is KVCache and c.keys is not None for c in cache):
        return "lone"
    return None


def _positions(first: Any, kind: str) -> tuple[Any, Any, Any]:
    """The step's (offset, left_padding, idx) as arrays, from the first layer's cache: a lone
    KVCache is a batch of one row without padding whose next position is its offset."""
    import mlx.core as mx

    if kind == "batch":
        return first.offset, first.left_padding, mx.array(first._idx, mx.int32)
    return (mx.array([first.offset], mx.int32), mx.zeros((1,), mx.int32),
            mx.array(first.offset, mx.int32))


def _twin(cache: Any) -> Any:
    """A copy of a BatchKVCache that steps without touching the original's arrays."""
    import mlx.core as mx

    twin = type(cache).__new__(type(cache))
    twin.__dict__.update(cache.__dict__)
    twin.keys, twin.values = mx.array(cache.keys), mx.array(cache.values)
    return twin


def _make_room(cache: list, kind: str) -> None:
    """Room for one more position, in buffers a multiple of STEP long (a filtered batch's
    are cut at the front; a lone cache's may be as long as its prompt), so shapes, and
    traces, change seldom."""
    import mlx.core as mx

    length = cache[0].keys.shape[2]
    written = cache[0]._idx if kind == "batch" else cache[0].offset
    wanted = -(-max(length, written + 1) // STEP) * STEP
    if wanted == length:
        return
    for c in cache:
        pad = [(0, 0), (0, 0), (0, wanted - length), (0, 0)]
        c.keys, c.values = mx.pad(c.keys, pad), mx.pad(c.values, pad)


def for_model(model: Any, enabled: bool) -> Any:
    """What BatchGenerator should call: the compiled step on CUDA (when `enabled`), else the
    model. Only CUDA's was measured (a CPU step is paced by its arithmetic, not by Python;
    Metal's was not tried)."""
    return CompiledDecode(model) if enabled and small_rows.usable() else model

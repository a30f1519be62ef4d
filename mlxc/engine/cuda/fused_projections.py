"""A layer's projections of one input as one matmul: q/k/v, and an MLP's gate/up (issue 24).

On MLX 0.32's CUDA backend a decode step is paced by launches, not by bytes: each
projection is a kernel of ~17 us whatever its size (H100, 3B shape, benchmarks/gpu_decode.py),
and a Llama-like layer has seven. Stacking the weights of projections that read the same
input along the output axis makes one launch of three (q/k/v) and one of two (gate/up).

Quantized layers only, because there it is exact: a quantized weight stacks row by row (each
output row keeps its packed words, scales and biases) and MLX's quantized matmul computes each
output on its own, so every logit is bit-identical (tests/test_fused_projections.py). A plain
matmul's blocking depends on the output count (BLAS on the CPU: logits 1e-5 apart), and
plain weights are not what this is for. The model's
code is untouched: each projection becomes a `_Member` that, called with the input its group
last computed, takes its slice of the stacked result; called with any other input (another
order, another caller), it computes the stacked matmul for that input itself.

A mixture of experts' `SwitchGLU` (mlx-lm's switch_layers.py: qwen3_moe and the like) stacks its
gate/up the same way: each expert's QuantizedSwitchLinear weight (experts, outputs, packed)
stacks along its outputs, so one `gather_qmm` of the active experts replaces two, and its
members are keyed on the input and the expert indices together.

Applied on CUDA only (MLXC_FUSED_PROJECTIONS, on by default there); Metal and CPU keep their
own layers. The stacked layers stay QuantizedLinear (or QuantizedSwitchLinear), so
cuda/quant_rows.py routes them like any other.
"""

from __future__ import annotations

from typing import Any

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _Stack:
    """The stacked layer of one group, and the last call it computed with its pieces."""

    def __init__(self, layer: Any, sizes: list[int]) -> None:
        self.layer, self.count = layer, len(sizes)
        self.bounds = [sum(sizes[:i + 1]) for i in range(len(sizes) - 1)]  # where to split
        self._input: tuple = ()  # the last call's arguments (an expert layer's: x, indices, ...)
        self._pieces: list | None = None
        self._left = 0  # pieces of the last result not yet taken

    def piece(self, index: int, *args: Any, **kwargs: Any) -> Any:
        import mlx.core as mx

        call = (*args, *kwargs.items())
        if self._pieces is None or self._pieces[index] is None or not _same(call, self._input):
            self._input = call
            self._pieces = list(mx.split(self.layer(*args, **kwargs), self.bounds, axis=-1))
            self._left = self.count
        piece, self._pieces[index] = self._pieces[index], None
        self._left -= 1
        if self._left == 0:  # all taken: hold no activations between calls
            self._input, self._pieces = (), None
        return piece


def _same(call: tuple, last: tuple) -> bool:
    """The same call: the very objects (identity, never values: a new input is a new array;
    a keyword such as an expert layer's `sorted_indices` is True or False). Identity can
    only say "different" too often, and then the stacked matmul is computed again: never a
    wrong piece."""
    if len(call) != len(last):
        return False
    for a, b in zip(call, last, strict=True):
        if a is b:
            continue
        if not (type(a) is tuple and type(b) is tuple and a[0] == b[0] and a[1] is b[1]):
            return False  # a keyword is (name, value)
    return True


def _member_class() -> type:
    import mlx.nn as nn

    class _Member(nn.Module):
        """One projection of a stacked group, as the model's code calls it."""

        def __init__(self, stack: _Stack, index: int) -> None:
            super().__init__()
            # not a child module: the stacked weights are registered once, on the parent
            object.__setattr__(self, "_stack", stack)
            object.__setattr__(self, "_index", index)

        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            return self._stack.piece(self._index, *args, **kwargs)

    return _Member


def _stacked(layers: list[Any]) -> Any | None:
    """One quantized layer whose outputs are `layers`' outputs side by side, or None unless
    all are QuantizedLinear (or all QuantizedSwitchLinear, one per expert, without a global
    scale) with one input size, expert count, quantization, scales' dtype and bias."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    kind = type(layers[0])
    if kind not in (nn.QuantizedLinear, QuantizedSwitchLinear) or any(
            type(x) is not kind or getattr(x, "global_scale", None) is not None for x in layers):
        return None
    shapes = {(x.weight.shape[:-2], x.weight.shape[-1], x.group_size, x.bits, x.mode,
               x.scales.dtype, x.get("biases") is None, "bias" in x) for x in layers}
    if len(shapes) != 1:
        return None
    first = layers[0]
    stacked = kind.__new__(kind)
    nn.Module.__init__(stacked)
    stacked.group_size, stacked.bits, stacked.mode = first.group_size, first.bits, first.mode
    stacked.biases = None
    if kind is QuantizedSwitchLinear:
        stacked.global_scale = None
    # outputs are the weight's second-to-last axis ((outputs, packed) or (experts, outputs,
    # packed)) and a bias's last ((outputs,) or (experts, outputs))
    for key, axis in (("weight", -2), ("scales", -2), ("biases", -2), ("bias", -1)):
        if first.get(key) is not None:
            stacked[key] = mx.concatenate([x[key] for x in layers], axis=axis)
    stacked.freeze()
    return stacked


def fuse(model: Any) -> int:
    """Stack every group of GROUPS found on one module of `model`; returns how many."""
    import mlx.core as mx

    member = _member_class()
    fused = 0
    for _, module in model.named_modules():
        for names in GROUPS:
            layers = [module.get(name) for name in names]
            if any(layer is None for layer in layers):
                continue
            stacked = _stacked(layers)
            if stacked is None:
                continue
            sizes = [layer.weight.shape[-2] for layer in layers]
            stack = _Stack(stacked, sizes)
            module["_".join(n.removesuffix("_proj") for n in names) + "_stacked"] = stacked
            for i, name in enumerate(names):
                module[name] = member(stack, i)
            mx.eval(stacked.parameters())  # the stacked copy now; the originals go with this
            fused += 1
    return fused


def install(model: Any, enabled: bool) -> int:
    """Fuse `model`'s projections on CUDA when `enabled`; elsewhere leave it as it is."""
    from mlxc.engine.cuda import small_rows

    return fuse(model) if enabled and small_rows.usable() else 0

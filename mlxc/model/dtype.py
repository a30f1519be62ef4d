"""Which dtype the model's weights run in, and turning a quantized model into it.

On MLX's CPU backend only float32 matmuls go through BLAS (see `blas.py`): quantized, bf16
and fp16 matmuls run MLX's own unvectorised loops. A small quantized model dequantized to
float32 at load time prefills ~15x faster there; on Metal the quantized kernels are the fast
path, so it stays as shipped. On CUDA (MLX 0.32.4) the quantized matmul slows down past 4
rows, so batches barely gain (H200, 3B shape, `benchmarks/diagnostics/batch_steps.py`: 4-bit 276
tok/s at batch 4, 159 at 8; dequantized 532 and 1,000, and one sequence as fast as 4-bit): a
quantized model that fits dequantized in a quarter of the GPU's memory is dequantized to its
scales' dtype there. Dequantizing is exact up to float rounding.

`choose_dtype` and `effective_dtype_without_mlx` import no mlx: the result is part of the
model fingerprint, which the cache-hit path computes without loading MLX.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import sys
from pathlib import Path

from mlxc.sidecar import read_json, write_json

DTYPES = ("auto", "float32", "bfloat16", "float16", "keep")
AUTO_RAM_FRACTION = 0.4  # float32 weights + KV cache + activations must still fit
CUDA_PLAIN_FRACTION = 0.25  # dequantized weights on CUDA: the rest is for KV and batches
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


def choose_dtype(requested: str, model_bytes: int, ram_bytes: int | None = None, *,
                 scales_dtype: str | None = None, gpu_bytes: int = 0) -> str:
    """Resolve `requested` (one of DTYPES) to "float32", "bfloat16", "float16" or "keep".

    `model_bytes` is the model's size in float32. "auto" gives "float32" on the CPU backend
    when that is under 40% of the machine's RAM, else "keep"; on CUDA, a quantized model's
    scales' dtype (`scales_dtype`) when it takes at most a quarter of the GPU's memory
    (`gpu_bytes`) in it, else "keep"; on Metal "keep". Memory is the total, not what is
    free right now, so every process resolves the same model the same way (the answer goes
    into the cache key). Pure and cheap: no mlx import.
    """
    if requested not in DTYPES:
        raise ValueError(f"unknown dtype {requested!r}: choose one of {', '.join(DTYPES)}")
    if requested != "auto":
        return requested
    if gpu_backend():
        if sys.platform == "darwin" or scales_dtype not in _ITEMSIZE:
            return "keep"
        plain = model_bytes * _ITEMSIZE[scales_dtype] // 4
        return scales_dtype if gpu_bytes and plain <= CUDA_PLAIN_FRACTION * gpu_bytes else "keep"
    ram = total_ram_bytes() if ram_bytes is None else ram_bytes
    return "float32" if ram and model_bytes < AUTO_RAM_FRACTION * ram else "keep"


def effective_dtype_without_mlx(requested: str, model_dir: Path,
                                cache_dir: Path | None = None) -> str:
    """`choose_dtype` for the MLX model folder `model_dir`, its float32 size read from the
    safetensors headers and config.json (no weights read, no mlx import); on CUDA, with its
    scales' dtype and the GPU's memory (kept under `cache_dir`)."""
    if requested != "auto":
        return choose_dtype(requested, 0)
    cuda = gpu_backend() and sys.platform != "darwin"
    try:
        size = float32_bytes(Path(model_dir))
        scales = scales_dtype(Path(model_dir)) if cuda else None
    except (OSError, ValueError, KeyError, struct.error):
        return "keep"  # unreadable folder: the loader will say why; don't guess a conversion
    gpu = cuda_memory_bytes(cache_dir) if scales else 0
    return choose_dtype(requested, size, scales_dtype=scales, gpu_bytes=gpu)


def gpu_backend() -> bool:
    """Whether MLX will run on a GPU here, decided without importing mlx: Metal on macOS, or
    a CUDA build of mlx on Linux (`mlx[cuda*]`)."""
    return sys.platform == "darwin" or _cuda_build_installed()


@functools.cache
def _cuda_build_installed() -> bool:
    """Whether a `mlx-cuda*` distribution is on sys.path, by its .dist-info folder's name (as
    importlib.metadata finds it, without that module's ~8 ms import on the cache-hit path)."""
    names = ("mlx_cuda_12-", "mlx_cuda_13-", "mlx_cuda-")
    for entry in sys.path:
        try:
            found = os.listdir(entry or ".")
        except OSError:  # a zip file, a folder gone
            continue
        if any(n.lower().startswith(names) and n.endswith(".dist-info") for n in found):
            return True
    return False


def cuda_memory_bytes(cache_dir: Path | None = None) -> int:
    """Total memory of CUDA device 0 (no MLX import); 0 if unknown. Starting the driver takes
    0.1-0.5 s and the cache-hit path asks too (the dtype is in the cache key), so the answer
    is kept in `cache_dir` for the rest of the boot."""
    if cache_dir is None:
        return _cuda_driver_memory()
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = ""
    known = cache_dir / "cuda-memory.json"
    kept = read_json(known)
    if boot and isinstance(kept, dict) and kept.get("boot") == boot:
        try:
            return int(kept["bytes"])
        except (KeyError, TypeError, ValueError):
            pass
    total = _cuda_driver_memory()
    if boot and total:
        write_json(known, {"boot": boot, "bytes": total})
    return total


def _cuda_driver_memory() -> int:
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device, total = ctypes.c_int(), ctypes.c_size_t()
        if (cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), 0)
                or cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device)):
            return 0
        return total.value
    except (OSError, AttributeError):
        return 0


def scales_dtype(model_dir: Path) -> str | None:
    """The dtype of a quantized model's scales (what its quantized layers compute in), from
    the safetensors headers; None for a model that is not quantized."""
    names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
    for file in sorted(model_dir.glob("*.safetensors")):
        for name, (dtype, _shape) in _safetensors_header(file).items():
            if name.endswith(".scales"):
                return names.get(dtype)
    return None


def total_ram_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0  # unknown: "auto" keeps the model as shipped


def float32_bytes(model_dir: Path) -> int:
    """Bytes the weights take once dequantized to float32. A quantized weight counts as its
    scales' element count times its group size; its scales and biases disappear."""
    tensors: dict[str, tuple[str, list[int]]] = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"no .safetensors in {model_dir}")
    for file in files:
        tensors.update(_safetensors_header(file))
    config = json.loads((model_dir / "config.json").read_text())
    quant = config.get("quantization") or config.get("quantization_config") or {}
    total = 0
    for name, (_dtype, shape) in tensors.items():
        module, _, kind = name.rpartition(".")
        if kind in ("scales", "biases") and f"{module}.weight" in tensors:
            continue
        if kind == "weight" and f"{module}.scales" in tensors:
            layer = quant.get(module) if isinstance(quant.get(module), dict) else quant
            group_size = layer.get("group_size", quant.get("group_size", 64))
            total += math.prod(tensors[f"{module}.scales"][1]) * group_size * 4
        else:
            total += math.prod(shape) * 4  # any other tensor (rare integer ones too) as float32
    return total


def _safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    # Format: 8-byte little-endian header length, then that many bytes of JSON.
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 100_000_000:
            raise ValueError(f"{path}: implausible safetensors header")
        header = json.loads(f.read(length))
    return {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"}


def apply_dtype(model, dtype: str, ready: dict | None = None) -> None:
    """Convert `model` (an mlx-lm model) in place to `dtype`: every QuantizedLinear and
    QuantizedEmbedding becomes a dequantized Linear / Embedding, and the other floating
    parameters are cast. "keep" leaves the model untouched. Evaluates the new weights.
    `ready`: weights already dequantized from the files (early_dequant.py), by module path."""
    if dtype == "keep":
        return
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_map_with_path

    target = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}.get(dtype)
    if target is None:
        raise ValueError(f"apply_dtype needs float32, bfloat16, float16 or keep, not {dtype!r}")

    def dequantized(layer, path: str) -> mx.array:
        mode = getattr(layer, "mode", "affine")
        early = (ready or {}).get(path)
        if early is not None and mode == "affine" and "biases" in layer and (
                early.bits, early.group_size, early.packed_shape) == (
                layer.bits, layer.group_size, tuple(layer.weight.shape)):
            return early.weight  # the same computation, done while mlx-lm was imported
        scales, biases = layer.scales, getattr(layer, "biases", None)
        if mode == "affine":
            # In float32, scale * q + bias escapes the extra rounding float16 would add.
            scales = scales.astype(mx.float32)
            biases = None if biases is None else biases.astype(mx.float32)
        if mode == "affine" and biases is not None and layer.bits in (2, 4, 8):
            w = _affine_dequantize(mx, layer.weight, scales, biases, layer.group_size,
                                   layer.bits)
        else:
            w = mx.dequantize(
                layer.weight, scales, biases, group_size=layer.group_size, bits=layer.bits,
                mode=mode, dtype=mx.float32,
            )  # fmt: skip
        return w.astype(target)

    def convert(path, module):
        if isinstance(module, nn.QuantizedLinear):
            w = dequantized(module, path)
            has_bias = "bias" in module
            linear = nn.Linear(w.shape[1], w.shape[0], bias=has_bias)
            linear.weight = w
            if has_bias:
                linear.bias = module.bias.astype(target)
            return linear
        if isinstance(module, nn.QuantizedEmbedding):
            w = dequantized(module, path)
            embedding = nn.Embedding(w.shape[0], w.shape[1])  # keeps as_linear for tied heads
            embedding.weight = w
            return embedding
        return module

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    model.apply(lambda x: x.astype(target) if mx.issubdtype(x.dtype, mx.floating) else x)
    mx.eval(model.parameters())


def _affine_dequantize(mx, weight, scales, biases, group_size: int, bits: int):
    """`mx.dequantize`'s float32 answer for affine 2-, 4- or 8-bit weights (whole values per
    byte), by vectorised array ops. MLX 0.32's CPU dequantize is a scalar loop: SmolLM2-135M's
    float32 conversion took 1.2-1.8 s with it, 0.46 s this way, bit for bit the same (each
    value is q * scale + bias, rounded after the product and after the sum, as that loop
    does; tests/test_load_time_paths.py compares every bit width and group size)."""
    packed = weight.view(mx.uint8)  # little-endian: a byte's low bits hold the first value
    if bits < 8:
        mask = (1 << bits) - 1
        packed = mx.stack([(packed >> shift) & mask for shift in range(0, 8, bits)], axis=-1)
    values = packed.reshape(*scales.shape, group_size).astype(mx.float32)
    w = values * scales[..., None] + biases[..., None]
    return w.reshape(*scales.shape[:-1], scales.shape[-1] * group_size)

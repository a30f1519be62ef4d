"""What a model on disk is, from its headers only: architecture, parameters, quantization,
context length, size, and whether mlxc can run it (and if not, why, by name).

An MLX / Hugging Face folder is read from config.json and its safetensors headers (8 bytes of
length, then JSON); a GGUF from its header (gguf_header.py). No weights are read, no MLX is
imported, so `mlxc models` stays fast over hundreds of models."""

from __future__ import annotations

import ast
import importlib.util
import json
import struct
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

# quant_method values mlx-lm's load() turns into MLX layers (mlx_lm/utils.py, 0.32); any other
# would be skipped by it and the packed weights read as plain ones.
MLX_LM_QUANT_METHODS = {"bitnet", "mxfp4", "mxfp8", "fp8", "compressed-tensors", "modelopt",
                        "awq", "gptq"}
_CONTEXT_KEYS = ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length")


@dataclass
class ModelInfo:
    architecture: str | None = None
    parameters: int | None = None
    quantization: str | None = None
    context_length: int | None = None
    size_bytes: int = 0
    format: str = "mlx"  # "mlx" (an MLX or Hugging Face safetensors folder) | "gguf"
    problems: list[str] = field(default_factory=list)

    @property
    def runnable(self) -> bool:
        return not self.problems


def describe_gguf(path: Path) -> ModelInfo:
    from mlxc.model.gguf_header import GGUFHeaderError, read_header, type_name

    info = ModelInfo(format="gguf")
    try:
        info.size_bytes = path.stat().st_size
        header = read_header(path)
    except (OSError, GGUFHeaderError) as exc:
        info.problems.append(str(exc))
        return info
    arch = header.get("general.architecture")
    info.architecture = arch if isinstance(arch, str) else None
    info.context_length = _int(header.get(f"{arch}.context_length"))
    counts: Counter = Counter()
    total = 0
    for shape, kind, _offset in header.tensors.values():
        n = 1
        for d in shape:
            n *= d
        total += n
        if len(shape) >= 2:
            counts[type_name(kind)] += n
    info.parameters = total
    info.quantization = _file_type(header.get("general.file_type")) or (
        counts.most_common(1)[0][0] if counts else None)
    info.problems.extend(gguf_problems(header, {type_name(k) for _, k, _ in
                                                header.tensors.values()}))
    return info


def gguf_problems(header, types: set[str]) -> list[str]:
    """Why mlxc's GGUF import (gguf.py) would refuse this file, in its own words."""
    from mlxc.model.gguf_arch import ARCHITECTURES, SUPPORTED
    from mlxc.model.gguf_tensors import IMPORTED
    from mlxc.model.gguf_tokenizer import TOKENIZERS

    problems = []
    arch = header.get("general.architecture")
    if (parts := _int(header.get("split.count"))) and parts > 1:
        problems.append(f"split GGUF ({parts} parts): join them with "
                        "`llama-gguf-split --merge` first")
    if arch not in ARCHITECTURES:
        problems.append(f"architecture {arch!r}: mlxc imports {SUPPORTED} GGUFs")
    if unknown := sorted(types - IMPORTED):
        problems.append(f"tensor types {', '.join(unknown)} are not imported")
    if (kind := header.get("tokenizer.ggml.model")) not in TOKENIZERS:
        problems.append(f"tokenizer {kind!r}: only byte-level BPE ('gpt2') and sentencepiece "
                        "('llama') are rebuilt")
    if "rope_freqs.weight" in header.tensors:
        from mlxc.model.gguf_rope import rope_freqs_problem

        if why := rope_freqs_problem(header):
            problems.append(why)
    scaling = header.get(f"{arch}.rope.scaling.type", "none")
    taken = ARCHITECTURES[arch].rope_scaling if arch in ARCHITECTURES else ()
    if scaling not in ("none", None, *taken):
        problems.append(f"{scaling!r} rope scaling is not imported")
    return problems


def _file_type(value) -> str | None:
    if not isinstance(value, int):
        return None
    from gguf.constants import LlamaFileType

    try:
        return LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return None


def describe_folder(folder: Path) -> ModelInfo:
    """An MLX or Hugging Face model folder (config.json and *.safetensors)."""
    info = ModelInfo()
    files = [p for p in folder.iterdir() if not p.name.startswith(".")]
    info.size_bytes = _size(files)
    try:
        config = json.loads((folder / "config.json").read_text())
        if not isinstance(config, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        info.problems.append(f"{folder / 'config.json'} cannot be read ({exc})")
        return info
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    info.architecture = config.get("model_type") or text.get("model_type")
    info.context_length = next((_int(c[k]) for c in (config, text) for k in _CONTEXT_KEYS
                                if _int(c.get(k))), None)
    names = {p.name for p in files}
    shards = sorted(p for p in files if p.suffix == ".safetensors")
    info.problems.extend(_folder_problems(folder, config, names, shards))
    quant = config.get("quantization") or text.get("quantization")
    method = config.get("quantization_config") or text.get("quantization_config") or {}
    info.parameters, dtype = _safetensors_counts(shards, quant if isinstance(quant, dict) else {})
    if isinstance(quant, dict) and quant.get("bits"):
        mode = quant.get("mode", "affine")
        info.quantization = f"{quant['bits']}-bit" + ("" if mode == "affine" else f" {mode}")
    elif isinstance(method, dict) and method.get("quant_method"):
        bits = method.get("bits")
        info.quantization = f"{method['quant_method']}" + (f" {bits}-bit" if bits else "")
    else:
        info.quantization = config.get("torch_dtype") or config.get("dtype") or dtype
    return info


def _folder_problems(folder: Path, config: dict, names: set[str], shards: list[Path]):
    problems = []
    model_type = config.get("model_type")
    if not model_type:
        problems.append("config.json has no model_type")
    elif not mlx_lm_supports(model_type):
        problems.append(f"architecture {model_type!r} is not in mlx-lm")
    if config.get("model_file") or config.get("auto_map"):
        if not model_type or not mlx_lm_supports(model_type):
            problems.append("it needs the model's own Python code (trust_remote_code)")
    if not shards:
        other = sorted(n for n in names if n.endswith((".bin", ".pt", ".pth", ".gguf")))
        problems.append("no .safetensors weights" + (f" (has {', '.join(other[:3])}; convert "
                                                     "it with mlx_lm.convert)" if other else ""))
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            problems.append(f"{index.name} cannot be read")
        else:
            if missing := sorted(wanted - names):
                problems.append(f"incomplete download: {', '.join(missing[:3])} missing")
    if not names & {"tokenizer.json", "tokenizer.model", "tiktoken.model", "vocab.json"}:
        problems.append("no tokenizer (tokenizer.json or tokenizer.model)")
    qc = config.get("quantization_config")
    if isinstance(qc, dict) and not config.get("quantization"):
        method = qc.get("quant_method")
        if method not in MLX_LM_QUANT_METHODS:
            problems.append(f"quantized with {method!r}, which mlx-lm cannot read")
    return problems


def _safetensors_counts(shards: list[Path], quant: dict) -> tuple[int | None, str | None]:
    """(parameters, most common dtype) from the shards' headers. An MLX-quantized weight is
    packed in uint32 words: it holds 32 / bits parameters a word."""
    tensors: dict[str, tuple[str, list[int]]] = {}
    for shard in shards:
        try:
            with open(shard, "rb") as f:
                (length,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(length))
        except (OSError, ValueError, struct.error):
            return None, None
        tensors.update({k: (v["dtype"], v["shape"]) for k, v in header.items()
                        if k != "__metadata__" and isinstance(v, dict)})
    total, dtypes = 0, Counter()
    for name, (dtype, shape) in tensors.items():
        base = name.removesuffix(".weight")
        if name.endswith((".scales", ".biases")) and f"{name.rsplit('.', 1)[0]}.weight" in \
                tensors and f"{name.rsplit('.', 1)[0]}.scales" in tensors:
            continue  # quantization's own numbers, not parameters
        n = 1
        for d in shape:
            n *= d
        if dtype == "U32" and f"{base}.scales" in tensors:
            layer = quant.get(base) if isinstance(quant.get(base), dict) else quant
            n = n * 32 // int(layer.get("bits", 4))
        total += n
        dtypes[dtype] += n
    names = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
    common = dtypes.most_common(1)[0][0] if dtypes else None
    return (total or None), names.get(common, common)


@lru_cache(maxsize=1)
def _mlx_lm_models() -> tuple[Path | None, dict]:
    """mlx-lm's models folder and its MODEL_REMAPPING, found without importing mlx-lm (which
    imports MLX: seconds)."""
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None or not spec.origin:
        return None, {}
    root = Path(spec.origin).parent
    remapping: dict = {}
    try:
        tree = ast.parse((root / "utils.py").read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    getattr(t, "id", None) == "MODEL_REMAPPING" for t in node.targets):
                remapping = ast.literal_eval(node.value)
    except (OSError, SyntaxError, ValueError):
        pass
    return root / "models", remapping


def mlx_lm_supports(model_type: str) -> bool:
    models, remapping = _mlx_lm_models()
    if models is None:
        return False
    name = remapping.get(model_type, model_type)
    return (models / f"{name.replace('-', '_')}.py").is_file() or (models / f"{name}.py").is_file()


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _size(files: list[Path]) -> int:
    """Bytes on disk, each file once (a Hugging Face snapshot's files are links to blobs)."""
    seen, total = set(), 0
    for p in files:
        try:
            st = p.stat()
        except OSError:
            continue
        if (st.st_dev, st.st_ino) not in seen and p.is_file():
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total

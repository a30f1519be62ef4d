"""Models already on this machine: the Hugging Face cache, LM Studio's folders, Ollama's store,
mlxc's own models folder and any folder the user names. Only names and places here (a stat or
a small JSON file each); describe.py reads what each one is.

Names, as `mlxc models` lists them and `-m` takes them:
  hf        org/name                      (a repo in the Hugging Face cache)
  lmstudio  publisher/repo                (an MLX folder) or publisher/repo/file.gguf
  ollama    name:tag, user/name:tag       (Ollama's own; `name` alone means name:latest)
  mlxc      a folder name in mlxc's models folder (org/name for a hub download)
  path      a folder or file under --path / MLXC_MODEL_PATH, named from there
`source:name` (hf:Qwen/Qwen2.5-0.5B) picks one when two places hold the same name."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

SOURCES = ("mlxc", "hf", "lmstudio", "ollama", "path")
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
OLLAMA_REGISTRY = "registry.ollama.ai"
SOURCE_FILE = ".mlxc-source.json"  # in a converted copy: what it was converted from
_MLXC_SKIP = {"downloads", "fingerprints", "hub"}
_LATER_PART = re.compile(r"-0*([2-9]|\d{2,})-of-\d+\.gguf$")  # a split GGUF's later parts


class AmbiguousModel(ValueError):
    """Two models answer to one name."""


@dataclass(frozen=True)
class Entry:
    name: str
    source: str  # one of SOURCES
    path: Path  # the model folder, or the GGUF file (an Ollama blob)
    aliases: tuple[str, ...] = ()
    problem: str | None = None  # found broken before reading it (a manifest's missing blob)
    origin: str | None = None  # a converted copy: the model it was converted from

    @property
    def is_gguf(self) -> bool:
        return self.source == "ollama" or self.path.suffix.lower() == ".gguf"

    @property
    def qualified(self) -> str:
        return f"{self.source}:{self.name}"


def hf_cache_dir() -> Path:
    if env := os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE"):
        return Path(env).expanduser()
    home = os.environ.get("HF_HOME") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def lmstudio_dirs() -> list[Path]:
    """LM Studio's models folders: today's (~/.lmstudio/models) and the older one."""
    home = Path.home()
    found = [home / ".lmstudio" / "models", home / ".cache" / "lm-studio" / "models"]
    if env := os.environ.get("LMSTUDIO_MODELS"):
        found.insert(0, Path(env).expanduser())
    return found


def ollama_dir() -> Path:
    return Path(os.environ.get("OLLAMA_MODELS") or Path.home() / ".ollama" / "models").expanduser()


def extra_paths(paths: Iterable[Path | str] = ()) -> list[Path]:
    """--path folders, then MLXC_MODEL_PATH's (os.pathsep between them)."""
    env = [p for p in os.environ.get("MLXC_MODEL_PATH", "").split(os.pathsep) if p]
    return [Path(p).expanduser() for p in [*paths, *env]]


def scan(models_dir: Path, paths: Iterable[Path | str] = ()) -> list[Entry]:
    """Every model in every place, in SOURCES order, names sorted within each."""
    found: list[Entry] = []
    found += sorted(_mlxc(models_dir), key=lambda e: e.name)
    found += sorted(_hf(hf_cache_dir()), key=lambda e: e.name)
    for root in _unique(lmstudio_dirs()):
        found += sorted(_tree(root, "lmstudio", "", 2), key=lambda e: e.name)
    found += sorted(_ollama(ollama_dir()), key=lambda e: e.name)
    for root in _unique(extra_paths(paths)):
        if root.is_file():
            found.append(Entry(root.name, "path", root))
        else:
            found += sorted(_tree(root, "path", root.name if _is_model(root) else "", 2),
                            key=lambda e: e.name)
    return found


def find(spec: str, models_dir: Path, paths: Iterable[Path | str] = ()) -> Entry | None:
    """The one entry named `spec` (or `source:name`); None if none is; AmbiguousModel if
    several are (mlxc's own copy of a hub repo wins over the Hugging Face cache's)."""
    source, _, rest = spec.partition(":")
    if source in SOURCES and rest:
        spec, places = rest, [source]
    else:
        places = list(SOURCES)
    matches = [e for e in _quick(spec, models_dir) if e.source in places and _named(e, spec)]
    if not matches:
        matches = [e for e in scan(models_dir, paths) if e.source in places and _named(e, spec)]
    matches = list({(e.source, e.path): e for e in matches}.values())
    if len(matches) > 1 and len(own := [e for e in matches if e.source == "mlxc"]) == 1:
        return own[0]
    if len(matches) > 1:
        where = "; ".join(f"{e.qualified} at {e.path}" for e in matches)
        raise AmbiguousModel(
            f"{len(matches)} models are named {spec!r} ({where}). Pick one with its source "
            f"(e.g. -m {matches[0].qualified}) or pass its path"
        )
    return matches[0] if matches else None


def _named(entry: Entry, spec: str) -> bool:
    return entry.name == spec or spec in entry.aliases


def _quick(spec: str, models_dir: Path) -> list[Entry]:
    """The places a name can only be in, looked at directly: the usual `-m` costs a few stats,
    not a scan (a cache hit must stay fast)."""
    out: list[Entry] = []
    if "/" not in spec and ":" not in spec and not spec.startswith("."):
        out += _mlxc(models_dir, only=spec)
    parts = spec.split("/")
    if len(parts) >= 2 and all(parts) and ":" not in spec and ".." not in parts:
        repo = "/".join(parts[:2])
        out += _mlxc(models_dir, only=repo)
        out += _hf(hf_cache_dir(), only=repo)
        for root in _unique(lmstudio_dirs()):
            out += _tree(root / repo, "lmstudio", repo, 0)
    name, _, tag = spec.rpartition(":") if ":" in spec else (spec, "", "latest")
    if name and tag and ".." not in spec:
        out += _ollama(ollama_dir(), only=(name, tag))
    return out


def _mlxc(models_dir: Path, only: str | None = None) -> Iterator[Entry]:
    if only is not None:
        folders = [models_dir / "hub" / only.replace("/", "--")] if "/" in only else [
            models_dir / only]
    else:
        folders = [p for p in _children(models_dir) if p.name not in _MLXC_SKIP]
        folders += _children(models_dir / "hub")
    for folder in folders:
        if not (folder / "config.json").is_file():
            continue
        hub = folder.parent.name == "hub" and folder.parent.parent == models_dir
        name = folder.name.replace("--", "/", 1) if hub else folder.name
        origin = None
        try:
            origin = json.loads((folder / SOURCE_FILE).read_text()).get("name")
        except (OSError, ValueError, AttributeError):
            pass
        yield Entry(name, "mlxc", folder, origin=origin)


def _hf(root: Path, only: str | None = None) -> Iterator[Entry]:
    repos = [root / f"models--{only.replace('/', '--')}"] if only else [
        p for p in _children(root) if p.name.startswith("models--")]
    for repo in repos:
        snapshot = _snapshot(repo)
        if snapshot is not None:
            yield from _tree(snapshot, "hf", repo.name[len("models--"):].replace("--", "/"), 1)


def _snapshot(repo: Path) -> Path | None:
    """The snapshot refs/main names, else the newest one."""
    try:
        commit = (repo / "refs" / "main").read_text().strip()
        if commit and (repo / "snapshots" / commit).is_dir():
            return repo / "snapshots" / commit
    except OSError:
        pass
    snapshots = _children(repo / "snapshots")
    return max(snapshots, key=lambda p: p.stat().st_mtime) if snapshots else None


def _tree(folder: Path, source: str, name: str, depth: int) -> Iterator[Entry]:
    """A model folder, the GGUF files in a folder, or (depth > 0) the same in its subfolders,
    named by their path below the root."""
    if _is_model(folder):
        yield Entry(name or folder.name, source, folder)
        return
    try:
        ggufs = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".gguf"
                       and not p.name.startswith((".", "mmproj")) and not _LATER_PART.search(
                           p.name))
    except OSError:
        return
    for gguf in ggufs:
        alias = (name,) if len(ggufs) == 1 and name else ()
        yield Entry(f"{name}/{gguf.name}" if name else gguf.name, source, gguf, alias)
    if depth > 0:
        for child in _children(folder):
            yield from _tree(child, source, f"{name}/{child.name}" if name else child.name,
                             depth - 1)


def _ollama(root: Path, only: tuple[str, str] | None = None) -> Iterator[Entry]:
    manifests = root / "manifests"
    if only is not None:
        name, tag = only
        parts = name.split("/")
        if len(parts) == 1:
            parts = [OLLAMA_REGISTRY, "library", *parts]
        elif len(parts) == 2:
            parts = [OLLAMA_REGISTRY, *parts]
        files = [manifests.joinpath(*parts, tag)] if len(parts) == 3 else []
    else:
        files = [p for p in manifests.glob("*/*/*/*") if p.is_file()] if manifests.is_dir() else []
    for manifest in files:
        if not manifest.is_file():
            continue
        host, space, model, tag = manifest.relative_to(manifests).parts
        prefix = "" if host == OLLAMA_REGISTRY and space == "library" else (
            f"{space}/" if host == OLLAMA_REGISTRY else f"{host}/{space}/")
        name = f"{prefix}{model}:{tag}"
        aliases = (f"{prefix}{model}",) if tag == "latest" else ()
        blob, problem = _ollama_blob(root, manifest)
        yield Entry(name, "ollama", blob, aliases, problem)


def _ollama_blob(root: Path, manifest: Path) -> tuple[Path, str | None]:
    try:
        layers = json.loads(manifest.read_text())["layers"]
        digest = next(layer["digest"] for layer in layers
                      if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except (OSError, ValueError, KeyError, TypeError):
        return manifest, f"Ollama manifest {manifest} cannot be read (not JSON with layers)"
    except StopIteration:
        return manifest, f"Ollama manifest {manifest} has no model layer ({OLLAMA_MODEL_LAYER})"
    blob = root / "blobs" / str(digest).replace(":", "-")
    if not blob.is_file():
        return blob, (f"Ollama manifest {manifest} names blob {blob.name}, which is not in "
                      f"{blob.parent}; pull the model again with Ollama")
    return blob, None


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _children(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return []


def _unique(paths: list[Path]) -> list[Path]:
    seen, out = set(), []
    for p in paths:
        key = os.path.realpath(p)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out

"""Which served model a request's `model` field means, without MLX.

    -m A -m small=./B --alias 'claude-haiku*=small' --alias 'claude-*'

Each model answers to its own name (`NAME=` given, else its folder or file name, or the repo
id), to its path, folder name and GGUF stem; an alias adds a name or a glob, for the model
after its `=` or, without one, for the default (the first `-m`). Exact names win over globs;
globs are tried in the order given. Names are compared case-insensitively.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path

from mlxc.errors import InputError
from mlxc.model.refs import ModelRef

GLOB = set("*?[")


def split_model_option(value: str) -> tuple[str | None, str]:
    """`NAME=PATH` -> (NAME, PATH); anything else (a path, a repo id, a name) -> (None, it).
    A NAME holds no '/', so a path that has '=' in a folder's name stays a path."""
    name, sep, spec = value.partition("=")
    if sep and name.strip() and spec.strip() and "/" not in name and not Path(value).exists():
        return name.strip(), spec.strip()
    return None, value


def served_name(ref: ModelRef) -> str:
    """The name /v1/models lists for a model not named with NAME=: the user's name for hub
    and default models, the folder or file name (not a whole path) for local ones."""
    return ref.name if ref.source in ("default", "hub") else Path(ref.name).name


def other_names(ref: ModelRef) -> list[str]:
    """Further names a model answers to: what the user passed, its folder, its GGUF stem."""
    names = [ref.name, ref.folder.name]
    if ref.source == "gguf":
        names.append(Path(ref.name).stem)
    return names


@dataclass(frozen=True)
class Alias:
    pattern: str
    target: int  # index of the served model

    @property
    def is_glob(self) -> bool:
        return bool(set(self.pattern) & GLOB)


class ModelNames:
    """Served names -> model index. Made once at start; read-only after (any thread)."""

    def __init__(self, names: list[str], refs: list[ModelRef], aliases: tuple[str, ...] = ()):
        self.names = names
        self.aliases = [self._alias(a) for a in aliases]
        exact: dict[str, int] = {}
        for i, name in enumerate(names):  # a model's own name first: never shadowed
            exact.setdefault(name.lower(), i)
        for alias in self.aliases:
            if not alias.is_glob:
                exact.setdefault(alias.pattern.lower(), alias.target)
        for i, ref in enumerate(refs):  # paths and folder names last
            for name in other_names(ref):
                exact.setdefault(name.lower(), i)
        self._exact = exact
        self._globs = [a for a in self.aliases if a.is_glob]

    def _alias(self, value: str) -> Alias:
        pattern, sep, target = value.rpartition("=")
        if not sep:
            return Alias(value, 0)
        wanted = target.strip().lower()
        for i, name in enumerate(self.names):
            if name.lower() == wanted:
                return Alias(pattern.strip(), i)
        raise InputError(
            f"--alias {value!r} names the model {target!r}, which is not served; "
            f"the models are {', '.join(self.names)} (name one with -m NAME=PATH)"
        )

    def find(self, name: str) -> int | None:
        """The index of the model `name` means, or None."""
        wanted = name.lower()
        if wanted in self._exact:
            return self._exact[wanted]
        for alias in self._globs:
            if fnmatchcase(wanted, alias.pattern.lower()):
                return alias.target
        return None

    def listed(self) -> list[tuple[str, int]]:
        """(name, model) for /v1/models: every model, then the aliases that are not globs."""
        rows = [(name, i) for i, name in enumerate(self.names)]
        rows += [(a.pattern, a.target) for a in self.aliases if not a.is_glob]
        seen: set[str] = set()
        return [r for r in rows if not (r[0].lower() in seen or seen.add(r[0].lower()))]

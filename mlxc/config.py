"""Settings from flags and MLXC_* environment variables; folders via platformdirs.

Imports nothing heavy: this module is on the cache-hit path.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field, replace
from pathlib import Path

from platformdirs import user_cache_dir, user_data_dir

APP = "mlxc"
DEFAULT_MODEL = "smollm2-135m-instruct"
CACHE_POLICIES = ("deterministic", "all", "off")
EVICTION_POLICIES = ("least-recently-used", "least-frequently-used", "least-recently-stored")
# auto: prompt lookup (and a request's prediction), then the draft model if one is given;
# ngram: prompt lookup only; draft: the draft model (batch rows: prompt lookup).
SPECULATE_MODES = ("auto", "off", "ngram", "draft")
DTYPES = ("auto", "float32", "bfloat16", "float16", "keep")


class ConfigError(ValueError):
    """A setting has a value mlxc cannot use; the message says which and what to do."""


def _env(name: str, default: str | None = None) -> str | None:
    value = os.environ.get(f"MLXC_{name}")
    return value if value not in (None, "") else default


def private_dir(path: Path) -> Path:
    """`path` as a folder only its owner can enter (0700), whatever the umask: cached answers
    and KV states hold private prompts. A folder that exists with wider rights is tightened,
    with a note on stderr (once per folder)."""
    path = Path(path)
    missing = []
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=0o700, exist_ok=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        os.chmod(path, mode & 0o700 | 0o700)
        logging.getLogger("mlxc.config").warning(
            "mlxc: note: %s was open to other users (mode %o); now 0700", path, mode)
    return path


def parse_size(text: str | int) -> int:
    """'2GB', '512m', '1_000_000' -> bytes."""
    if isinstance(text, int):
        return text
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    s = text.strip().lower().replace("_", "").removesuffix("ib").removesuffix("b")
    try:
        if s and s[-1] in units:
            return int(float(s[:-1]) * units[s[-1]])
        return int(s)
    except ValueError:
        raise ConfigError(
            f"cannot read size {text!r}: use e.g. 2GB, 512MB or a byte count"
        ) from None


@dataclass(frozen=True)
class Settings:
    """Everything a command needs to know about where things live and how to cache."""

    model: str = DEFAULT_MODEL
    cache_dir: Path = field(default_factory=lambda: Path(user_cache_dir(APP)))
    models_dir: Path = field(default_factory=lambda: Path(user_data_dir(APP)) / "models")
    cache_policy: str = "deterministic"
    cache_size_limit: int = 2 << 30
    eviction_policy: str = "least-recently-used"
    ttl_seconds: float | None = None
    dtype: str = "auto"
    redis_url: str | None = None
    prefix_memory_bytes: int | None = None  # None: a share of free memory
    prefix_disk_bytes: int = 4 << 30
    prefix_block_tokens: int = 256  # KV block size of the prefix cache (tokens)
    prefix_disk_bits: int = 0  # 8: the prefix cache's disk blocks as 8-bit K/V (0: as computed)
    next_turn_prefill: bool = False  # serve: prefill a follow-up's opening while idle
    batch_kernels: bool = True  # CUDA: batched steps by cuda/small_rows.py, batch_attention.py
    compiled_decode: bool = True  # CUDA: decode steps compiled (cuda/compiled_decode.py)
    fused_projections: bool = True  # CUDA: q/k/v, gate/up as one matmul (fused_projections.py)
    speculate: str = "auto"  # speculative decoding (engine/decode/speculate.py)
    draft_model: str | None = None  # a model with the same tokenizer (decode/draft_model.py)

    @property
    def response_dir(self) -> Path:
        return self.cache_dir / "responses"

    @property
    def prefix_dir(self) -> Path:
        return self.cache_dir / "prefix"

    def with_overrides(self, **overrides) -> Settings:
        """Apply CLI flags; None means 'not given'."""
        given = {k: v for k, v in overrides.items() if v is not None}
        for key in ("cache_dir", "models_dir"):
            if key in given:
                given[key] = Path(given[key]).expanduser()
        return replace(self, **given).validated()

    def validated(self) -> Settings:
        if self.cache_policy not in CACHE_POLICIES:
            raise ConfigError(
                f"unknown cache policy {self.cache_policy!r}: "
                f"use one of {', '.join(CACHE_POLICIES)}"
            )
        if self.eviction_policy not in EVICTION_POLICIES:
            raise ConfigError(
                f"unknown eviction policy {self.eviction_policy!r}: "
                f"use one of {', '.join(EVICTION_POLICIES)}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"unknown dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not 16 <= self.prefix_block_tokens <= 4096:
            raise ConfigError("the prefix block size must be 16 to 4096 tokens")
        if self.prefix_disk_bits not in (0, 8):
            raise ConfigError("the prefix cache's disk bits must be 0 (off) or 8")
        if self.speculate not in SPECULATE_MODES:
            raise ConfigError(f"unknown speculate mode {self.speculate!r}: "
                              f"use one of {', '.join(SPECULATE_MODES)}")
        if self.speculate == "draft" and not self.draft_model:
            raise ConfigError("--speculate draft needs a draft model: give one with "
                              "--draft-model PATH (MLXC_DRAFT_MODEL), or use auto")
        if self.ttl_seconds is not None and self.ttl_seconds <= 0:
            raise ConfigError("the cache TTL must be a positive number of seconds")
        return self


def load_settings() -> Settings:
    """Defaults overlaid with MLXC_* environment variables."""
    base = Settings()
    ttl = _env("CACHE_TTL")
    mem = _env("PREFIX_MEMORY")
    try:
        ttl_value = float(ttl) if ttl else None
    except ValueError:
        raise ConfigError(f"MLXC_CACHE_TTL={ttl!r} is not a number of seconds") from None
    return replace(
        base,
        model=_env("MODEL", base.model),
        cache_dir=Path(_env("CACHE_DIR", str(base.cache_dir))).expanduser(),
        models_dir=Path(_env("MODELS_DIR", str(base.models_dir))).expanduser(),
        cache_policy=_env("CACHE_POLICY", base.cache_policy),
        cache_size_limit=parse_size(_env("CACHE_SIZE", str(base.cache_size_limit))),
        eviction_policy=_env("CACHE_EVICTION", base.eviction_policy),
        ttl_seconds=ttl_value,
        dtype=_env("DTYPE", base.dtype),
        redis_url=_env("REDIS_URL"),
        prefix_memory_bytes=parse_size(mem) if mem else None,
        prefix_disk_bytes=parse_size(_env("PREFIX_DISK", str(base.prefix_disk_bytes))),
        prefix_block_tokens=_int_env("PREFIX_BLOCK", base.prefix_block_tokens),
        prefix_disk_bits=_int_env("PREFIX_DISK_BITS", base.prefix_disk_bits),
        batch_kernels=_bool_env("BATCH_KERNELS", base.batch_kernels),
        compiled_decode=_bool_env("COMPILED_DECODE", base.compiled_decode),
        fused_projections=_bool_env("FUSED_PROJECTIONS", base.fused_projections),
        speculate=_env("SPECULATE", base.speculate),
        draft_model=_env("DRAFT_MODEL"),
    ).validated()


def _bool_env(name: str, default: bool) -> bool:
    value = _env(name)
    if value is None:
        return default
    if value.lower() in ("1", "on", "true", "yes"):
        return True
    if value.lower() in ("0", "off", "false", "no"):
        return False
    raise ConfigError(f"MLXC_{name}={value!r} is not on or off (1/0)")


def _int_env(name: str, default: int) -> int:
    value = _env(name)
    try:
        return int(value) if value else default
    except ValueError:
        raise ConfigError(f"MLXC_{name}={value!r} is not a whole number") from None

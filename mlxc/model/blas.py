"""Route MLX's float matmuls through an optimised BLAS on Linux.

MLX's Linux CPU wheel links a reference BLAS (~6 GFLOP/s for fp32 2048x2048 here). A library
that exports the standard `cblas_*` symbols, opened with RTLD_GLOBAL *before* the first
`import mlx.core`, is found first when libmlx binds `cblas_sgemm` (~200 GFLOP/s with OpenBLAS
on 2 cores). Opened after that import it changes nothing: the symbols are already bound.
Only float32 matmuls benefit: MLX's CPU bf16/fp16 and quantized matmuls never call BLAS.

This module must not import mlx (it runs first, and on paths that never load a model).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import os
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass

ENV_VAR = "MLXC_BLAS"
_DISABLED = {"none", "off", "0", "false", "bundled"}

# Debian/Ubuntu keep each OpenBLAS flavour in its own folder (pthread first: measured fastest
# with MLX's own threads on 2 cores); Fedora/RHEL name the flavours libopenblas{p,o}.
_SYSTEM_DIRS = (
    "/usr/lib/x86_64-linux-gnu",
    "/usr/lib/aarch64-linux-gnu",
    "/usr/lib64",
    "/usr/lib",
    "/usr/local/lib",
)
_SYSTEM_NAMES = (
    "openblas-pthread/libopenblas.so.0",
    "openblas-openmp/libopenblas.so.0",
    "openblas-serial/libopenblas.so.0",
    "libopenblasp.so.0",
    "libopenblaso.so.0",
    "libopenblas.so.0",
    "libopenblas.so",
    "libblis.so.4",
)
_FIND_LIBRARY_NAMES = ("openblas", "openblasp", "blis")

# PyPI wheels that ship an unprefixed cblas (scipy-openblas32/64 and numpy's copy prefix their
# symbols with `scipy_`, so MLX cannot bind to them). Relative to a sys.path entry, or to
# sys.prefix for the `mkl` wheel, which installs into <prefix>/lib.
_PIP_SITE = (
    ("ngsolve-openblas", "ngsolve_openblas/libopenblas*.so*"),
    ("cmeel-openblas", "cmeel.prefix/lib/libopenblas.so.0"),
)
_PIP_PREFIX = (("mkl", "lib/libmkl_rt.so.*"),)


@dataclass(frozen=True)
class BlasInfo:
    """Which BLAS MLX's float matmuls use in this process.

    name: "openblas", "mkl", "blis", the file's stem, "bundled" or "Accelerate".
    path: the library loaded, None when nothing was loaded.
    source: "MLXC_BLAS", "system", "pip:<package>", "bundled" or "macOS".
    note: why nothing was loaded, when that is the case ("" otherwise).
    """

    name: str
    path: str | None
    source: str
    note: str = ""

    @property
    def optimised(self) -> bool:
        return self.path is not None or self.name == "Accelerate"


_lock = threading.Lock()
_info: BlasInfo | None = None


def load_optimised_blas() -> BlasInfo:
    """Load the best cblas found, once per process (later calls return the first result).

    Order: $MLXC_BLAS (a path; "none" disables), system OpenBLAS/BLIS, a PyPI wheel. Never
    raises: anything missing or failing falls back silently to MLX's bundled BLAS. Call it
    before the first `import mlx.core` in the process. Thread-safe.
    """
    global _info
    with _lock:
        if _info is None:
            _info = _load()
        return _info


def blas_info() -> BlasInfo | None:
    """The result of `load_optimised_blas()`, or None if it has not been called yet."""
    return _info


def _load() -> BlasInfo:
    if sys.platform == "darwin":
        return BlasInfo("Accelerate", None, "macOS")  # MLX links Accelerate and uses Metal
    if not sys.platform.startswith("linux"):
        return BlasInfo("bundled", None, "bundled", f"no BLAS search on {sys.platform}")
    requested = os.environ.get(ENV_VAR, "").strip()
    if requested.lower() in _DISABLED:
        return BlasInfo("bundled", None, "bundled", f"{ENV_VAR}={requested}")
    if "mlx.core" in sys.modules:
        # libmlx has bound its cblas symbols already; loading now would change nothing.
        return BlasInfo("bundled", None, "bundled", "mlx.core was imported first")
    if requested:
        candidates = iter([(requested, ENV_VAR)])
    else:
        candidates = _candidates()
    notes = []
    for path, source in candidates:
        error = _try_load(path)
        if error is None:
            return BlasInfo(_name(path), path, source)
        notes.append(f"{path}: {error}")
    return BlasInfo("bundled", None, "bundled", "; ".join(notes) or "no optimised BLAS found")


def _candidates() -> Iterator[tuple[str, str]]:
    """(path, source) to try in order; lazy, so the slower searches run only when needed."""
    seen = set()
    for path, source in _search():
        key = os.path.realpath(path) if os.sep in path else path
        if key not in seen:
            seen.add(key)
            yield path, source


def _search() -> Iterator[tuple[str, str]]:
    for folder in _SYSTEM_DIRS:
        for name in _SYSTEM_NAMES:
            path = os.path.join(folder, name)
            if os.path.exists(path):
                yield path, "system"
    for name in _FIND_LIBRARY_NAMES:
        lib = ctypes.util.find_library(name)  # a bare soname (dlopen searches ld.so's paths)
        if lib:
            yield lib, "system"
    roots = [p for p in sys.path if p and os.path.isdir(p)]
    for package, pattern in _PIP_SITE:
        for root in roots:
            for path in sorted(glob.glob(os.path.join(root, pattern))):
                yield path, f"pip:{package}"
    for package, pattern in _PIP_PREFIX:
        for path in sorted(glob.glob(os.path.join(sys.prefix, pattern))):
            yield path, f"pip:{package}"


def _try_load(path: str) -> str | None:
    """Open `path`, check that its cblas_sgemm computes a product, then make it global.
    Returns None on success, else why not."""
    _set_thread_defaults(path)
    try:
        # RTLD_LOCAL first: a library without cblas must not interpose any of its symbols.
        lib = ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        sgemm = lib.cblas_sgemm
    except (OSError, AttributeError) as exc:
        return str(exc) or type(exc).__name__
    if not _sgemm_works(sgemm):
        return "its cblas_sgemm gave a wrong product"
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)  # same handle, promoted to global scope
    except OSError as exc:
        return str(exc)
    return None


def _sgemm_works(sgemm) -> bool:
    f, i = ctypes.c_float, ctypes.c_int
    a, b, c = (f * 4)(1, 2, 3, 4), (f * 4)(5, 6, 7, 8), (f * 4)()
    sgemm.restype = None
    sgemm.argtypes = [i, i, i, i, i, i, f, ctypes.c_void_p, i, ctypes.c_void_p, i, f,
                      ctypes.c_void_p, i]  # fmt: skip
    sgemm(101, 111, 111, 2, 2, 2, 1.0, a, 2, b, 2, 0.0, c, 2)  # row-major, no transpose
    return list(c) == [19.0, 22.0, 43.0, 50.0]


def _set_thread_defaults(path: str) -> None:
    # Both libraries read these once, when first loaded. OpenBLAS defaults to all cores of
    # the machine, which oversubscribes a CPU-limited container; use the cores we may run on.
    cores = str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else None
    if cores and "openblas" in path.lower():
        os.environ.setdefault("OPENBLAS_NUM_THREADS", cores)
    if "mkl" in path.lower():
        # MKL's default Intel threading layer needs libiomp5 loaded first, or it aborts the
        # process; GNU OpenMP is on most systems, sequential always works.
        layer = "GNU" if ctypes.util.find_library("gomp") else "SEQUENTIAL"
        os.environ.setdefault("MKL_THREADING_LAYER", layer)


def _name(path: str) -> str:
    base = os.path.basename(path).lower()
    for name in ("openblas", "mkl", "blis"):
        if name in base:
            return name
    return base.split(".so")[0].removeprefix("lib") or base

"""This process's place in an `mx.distributed` world, as /health and the logs show it."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class World:
    rank: int
    size: int
    backend: str  # ring | nccl | jaccl | mpi | none
    host: str

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def join(backend: str = "any") -> tuple[Any, World]:
    """(group, World) of this process. Under `mlx.launch` the launcher's variables name the
    backend and the peers; started alone, a world of one (MLX's own fallback)."""
    import mlx.core as mx

    group = mx.distributed.init(strict=False, backend=backend)
    named = os.environ.get("MLX_BACKEND") or ("ring" if os.environ.get("MLX_HOSTFILE")
                                               else "nccl" if os.environ.get("NCCL_HOST_IP")
                                               else "none")
    return group, World(group.rank(), group.size(), named if group.size() > 1 else "none",
                        socket.gethostname())

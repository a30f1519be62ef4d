"""Which model a name means, its fingerprint, GGUF import, dtype and BLAS choice.

Nothing here imports MLX at import time: the cache-hit path (`mlxc ask` hit, `cache stats`)
needs a model's identity and must not pay seconds for MLX, so this package is that boundary.
"""

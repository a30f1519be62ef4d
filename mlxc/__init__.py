"""mlxc: local language models with MLX, from the shell and behind an API, with durable caches."""

__version__ = "0.1.0"

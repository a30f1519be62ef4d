"""mlxc's CUDA kernels and the compiled batched decode step. Imported only when MLX runs on
CUDA (worker.py decides); a lone sequence's step and prefills run mlx-lm's code untouched.

- `small_rows.py` — projections of a few rows at once;
- `batch_attention.py` — one new token's attention over a left-padded batch cache;
- `batch_kernels.py` — switches both in around a batched step;
- `compiled_decode.py` — a batched step built once per shape and replayed (`mx.compile`).

Imports nothing of the engine's outside this package.
"""

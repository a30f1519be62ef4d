"""mlxc's CUDA kernels, stacked projections and the compiled decode step. Used only when MLX
runs on CUDA (engine/load.py decides); prefills run mlx-lm's code untouched.

- `small_rows.py` — projections of a few rows at once;
- `batch_attention.py` — one new token's attention over a left-padded batch cache;
- `batch_kernels.py` — switches both in around a batched step;
- `quant_rows.py` — quantized projections of 1-16 rows (MLXC_QUANT_KERNEL=1, opt-in);
- `fused_projections.py` — q/k/v and gate/up of a quantized layer as one matmul each (a
  mixture of experts' gate/up as one gather of the active experts);
- `compiled_decode.py` — a decode step (the batch's, or a lone sequence's) built once per
  shape and replayed (`mx.compile`).

Imports nothing of the engine's outside this package.
"""

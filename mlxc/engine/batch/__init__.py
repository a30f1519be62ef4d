"""Continuous batching on the engine thread: which requests run, together, and when.

- `scheduler.py` — joins and leaves between decode steps; one step a tick.
- `pacing.py` — how a prompt prefilled beside running streams shares the engine's time.
- `admission.py` — memory-aware admission: a request is prefilled only when its KV fits.
- `sequence.py` — one request in the batch: its prompt, state, sampler and output.
- `lone.py` — the loop of a sequence that runs alone (mlx-lm's own, one step a tick).
- `speculative.py` — a batch step where each row verifies its own draft (ragged).
- `generator.py` — mlx-lm's `BatchGenerator`, less one copy of the KV caches.
- `figures.py`, `limits.py` — what /health shows of the batch; batch and queue defaults
  (`limits.py` imports no MLX: the CLI shows them before a model loads).

May import `decode/` and `kv/`; nothing there imports this package.
"""

"""The engine: one thread that owns the model (worker.py) and everything it runs.

- `worker.py` — the engine thread: `submit` a request, get a `Generation` (mlxc/stream.py).
- `load.py` — the model load: folder ready, weights and tokenizer, dtype, the batch path's pieces.
- `warmup.py` — runs every path once before a server reports ready (CUDA compiles kernels).
- `kv/` — the prefix KV store: token prefix -> KV state, in memory and on disk.
- `batch/` — continuous batching: the scheduler, memory admission, one `Sequence` per request.
- `decode/` — one sequence's tokens: the token loop, sampling, stops, logprobs, grammars, tools.
- `cuda/` — mlxc's CUDA kernels and the compiled batched step, imported only on CUDA.

Imports go downwards: worker, warmup -> batch -> kv -> decode; `cuda/` imports only itself.
Importing this package imports no MLX: the response-cache hit path and `mlxc cache stats`
stay light.
"""

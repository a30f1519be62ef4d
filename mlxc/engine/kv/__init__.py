"""The prefix KV store: a token prefix -> the model's KV state after it, so a follow-up turn or
a shared system prompt prefills only the tokens it has not seen.

Invariants (each is tested; break one and answers change or the disk fills):
1. Reuse never changes an answer: a state fetched for a prefix is the state a cold prefill of
   that prefix computes (greedy tokens identical). A block is named by what determines its KV:
   the model's fingerprint, KV dtype and layout (the chain's root), every token before it, its
   own tokens. Equal names mean equal KV.
2. The store never holds the engine up on the disk: blocks are written by one writer thread
   (temporary file, fsync, rename), so a `kill -9` leaves each file whole or absent.
3. Whatever is on disk is checked before it is trusted: a file that is not a whole block (size,
   header) or whose bytes fail its checksum is dropped (counted in `blocks_damaged`) and the
   request prefills as if it were absent.
4. Memory and disk hold the same blocks; memory is a cache of the disk tier, bounded by
   `prefix_memory` bytes, and the disk by `prefix_disk` bytes (least recently used go first).
5. MLX is touched on the engine thread only; the index (SQLite WAL) and block files are
   process-safe, so several servers and `mlxc cache stats` can share one folder.

Two layouts of one store, chosen by the model's cache (`cache.py`):
- blocks (`block_*.py`, `blocks.py`) for trimmable caches (full attention);
- whole states (`states.py`, `state_disk.py`, `memory.py`) for caches that cannot be cut
  (sliding windows, recurrent layers), kept at message boundaries (`turns.py`).
`divergence.py` says why a prompt missed (tokens reused, tier, where the stored neighbour
parts), by token comparison on the engine thread; its text is worked out later, off it.
`index.py` holds both layouts' rows and the counters in one SQLite file. May import
`decode/` (the chat template's messages, the prefill loop), never `batch/`; the modules without
MLX (`index.py`, `blocks.py`, `block_file.py`, `block_index.py`, `turns.py`) are what
`mlxc cache` uses.
"""

"""Where a restart's block load goes: the parts of reading a long prefix back from the disk
tier's block files, each timed on its own, against mlx-lm loading the same state from one file.

    python benchmarks/diagnostics/block_load.py --model /tmp/m3b --tokens 8192

Writes the blocks with the disk tier's own file writer, then times (medians of --reps) the way
the disk tier loads them (prefix_block_cache.BlockTiers._load): opening the files and making
MLX arrays to read into, reading the files straight into them on threads, making the block's
arrays (bfloat16 views, 8-bit ones dequantized), joining them into a cache, and one decode step
on it; and mlx-lm's `load_prompt_cache` of the whole state for comparison.
Files are read from the page cache (just written), as in a restart on the same machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--block", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--alloc", default="cpu", help="streams to zero-fill the blocks on "
                        "before reading, compared: cpu (the disk tier's), gpu, or cpu,gpu")
    args = parser.parse_args()

    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    from mlxc.engine.kv.block_disk import READERS
    from mlxc.engine.kv.block_file import BlockHeader, open_block, read_into, write_temp
    from mlxc.engine.kv.block_kv import (
        assemble,
        blank,
        byte_view,
        cut,
        from_file,
        split,
        to_buffers,
    )

    model, _ = load(args.model)
    cache = make_prompt_cache(model)
    tokens = mx.array([[(i * 7919) % 30000 + 10 for i in range(args.tokens)]], mx.uint32)
    for a in range(0, args.tokens, 2048):
        model(tokens[:, a : a + 2048], cache=cache)
        mx.eval([c.state for c in cache])
    out: dict = {"tokens": args.tokens, "block": args.block}
    with tempfile.TemporaryDirectory(prefix="mlxc-blockload-") as tmp:
        folder = Path(tmp)
        paths = []
        for i, a in enumerate(range(0, args.tokens, args.block)):
            pieces = cut(cache, a, a + args.block)
            mx.eval(pieces)
            specs, views = to_buffers(pieces)
            header = BlockHeader(f"b{i}", f"b{i - 1}", "root", a, [0] * args.block, specs)
            temp, _ = write_temp(folder / f"b{i}.kvb", header, views, fsync=False)
            temp.rename(folder / f"b{i}.kvb")
            paths.append(folder / f"b{i}.kvb")
        whole = str(folder / "whole.safetensors")
        save_prompt_cache(whole, cache)
        out["state_bytes"] = sum(p.stat().st_size for p in paths)
        del cache
        mx.clear_cache()

        times: dict[str, list[float]] = {}

        @contextmanager
        def timed(name):
            t = time.perf_counter()
            yield
            times.setdefault(name, []).append(time.perf_counter() - t)

        step = mx.array([[11]], mx.uint32)
        for _ in range(args.reps):
            for where in args.alloc.split(","):
                stream = mx.gpu if where == "gpu" else mx.cpu
                tag = "" if where == "cpu" else f"{where}_"
                with timed(f"{tag}open_and_allocate"):
                    opened = [open_block(p) for p in paths]
                    into = [blank(sum(a["nbytes"] for a in o.header.arrays), stream)
                            for o in opened]
                with timed(f"{tag}read_files"), ThreadPoolExecutor(READERS) as pool:
                    list(pool.map(read_into, opened, [[byte_view(x)] for x in into]))
                with timed(f"{tag}to_mlx"):
                    blocks = [from_file(o.header.arrays, split(x, o.header.arrays))
                              for o, x in zip(opened, into, strict=True)]
                    mx.eval(blocks)
                del into
                with timed(f"{tag}assemble"):
                    joined = assemble(make_prompt_cache(model), blocks,
                                      [args.block] * len(blocks))
                with timed(f"{tag}first_step"):
                    mx.eval(model(step, cache=joined))
                del blocks, joined
                mx.clear_cache()
            with timed("mlx_lm_load_whole"):
                loaded = load_prompt_cache(whole)
                mx.eval([c.state for c in loaded])
            with timed("mlx_lm_first_step"):
                mx.eval(model(step, cache=loaded))
            del loaded
            mx.clear_cache()
    out.update({k: round(statistics.median(v), 4) for k, v in times.items()})
    parts = ("open_and_allocate", "read_files", "to_mlx", "assemble", "first_step")
    for where in args.alloc.split(","):
        tag = "" if where == "cpu" else f"{where}_"
        out[f"{tag}blocks_total"] = round(sum(out[tag + k] for k in parts), 4)
    out["mlx_lm_total"] = round(out["mlx_lm_load_whole"] + out["mlx_lm_first_step"], 4)
    print(json.dumps(out))



if __name__ == "__main__":
    main()

"""`mlxc models` over 200 models (issue 26 target: <= 1 s): 50 each in a Hugging Face cache,
LM Studio's folder, Ollama's store and --path GGUFs, made here (tiny configs, safetensors headers
and GGUFs). Times the listing in-process (scan + describe), median of 5.

    .venv/bin/python benchmarks/models_list.py
"""

from __future__ import annotations

import json
import os
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def tiny_gguf(path: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_uint32("qwen2.context_length", 4096)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(1000)])
    for i in range(24):
        w.add_tensor(f"blk.{i}.attn_q.weight", np.zeros((8, 32), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def tiny_folder(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama",
                                                    "max_position_embeddings": 2048}))
    (folder / "tokenizer.json").write_text("{}")
    header = json.dumps({f"model.layers.{i}.w": {"dtype": "F16", "shape": [8, 8],
                                                 "data_offsets": [0, 128]} for i in range(24)})
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header.encode()
                                               + bytes(128))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="models-bench-"))
    os.environ.update(HF_HUB_CACHE=str(root / "hf"), LMSTUDIO_MODELS=str(root / "lms"),
                      OLLAMA_MODELS=str(root / "ollama"), HOME=str(root / "home"))
    template = root / "one.gguf"
    tiny_gguf(template)
    for i in range(50):
        snap = root / "hf" / f"models--org--m{i}" / "snapshots" / "c0"
        tiny_folder(snap)
        tiny_folder(root / "lms" / "pub" / f"m{i}")
        blob = root / "ollama" / "blobs" / f"sha256-{i:064x}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(template.read_bytes())
        manifest = root / "ollama" / "manifests" / "registry.ollama.ai" / "library" / f"m{i}" / "1b"
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"layers": [{
            "mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{i:064x}"}]}))
        (root / "ggufs").mkdir(exist_ok=True)
        (root / "ggufs" / f"m{i}.gguf").write_bytes(template.read_bytes())
    from mlxc.model.describe import describe_folder, describe_gguf
    from mlxc.model.discover import scan

    times = []
    for _ in range(5):
        start = time.perf_counter()
        entries = scan(root / "mlxc", [root / "ggufs"])
        infos = [describe_gguf(e.path) if e.is_gguf else describe_folder(e.path) for e in entries]
        times.append(time.perf_counter() - start)
    assert len(infos) == 200 and all(i.runnable or i.format == "gguf" for i in infos)
    print(f"{len(entries)} models: median {statistics.median(times) * 1000:.0f} ms "
          f"(runs: {', '.join(f'{t * 1000:.0f}' for t in times)} ms)", file=sys.stderr)


if __name__ == "__main__":
    main()

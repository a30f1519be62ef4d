"""Draft models made from a real one for the draft-model tests and benchmark: a copy of an MLX
folder with only some of its transformer layers (renumbered), its final norm, head and
tokenizer files kept, so it is a real, smaller model with the very same tokenizer. The only real
model on this machine is SmolLM2-135M, so its drafts are cut from it; a draft that skips most
layers agrees with the whole model on few tokens (the benchmark reports it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

LAYER = "model.layers."


def layers_copy(source: Path, folder: Path, layers: list[int]) -> Path:
    """`source` with only `layers` (in that order, renumbered 0..n-1)."""
    import mlx.core as mx

    folder.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name != "config.json" \
                and not f.name.startswith(".mlxc"):
            shutil.copy(f, folder / f.name)
    config = json.loads((source / "config.json").read_text())
    config["num_hidden_layers"] = len(layers)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    new_index = {old: new for new, old in enumerate(layers)}
    kept: dict = {}
    for shard in sorted(source.glob("*.safetensors")):
        for name, array in mx.load(str(shard)).items():
            if not name.startswith(LAYER):
                kept[name] = array
                continue
            number, rest = name[len(LAYER):].split(".", 1)
            if int(number) in new_index:
                kept[f"{LAYER}{new_index[int(number)]}.{rest}"] = array
    mx.save_safetensors(str(folder / "model.safetensors"), kept, metadata={"format": "mlx"})
    return folder


def vocab_changed_copy(source: Path, folder: Path) -> Path:
    """`source` with two tokens' strings swapped in its tokenizer: the same size, different
    ids: a draft whose tokens do not mean the target's."""
    shutil.copytree(source, folder, ignore=shutil.ignore_patterns(".mlxc-fingerprint.json"))
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = "hello", "world"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    return folder

"""`mlxc models` finds models where other tools keep them (Hugging Face cache, LM Studio,
Ollama, mlxc's folder, --path), from headers only, and `-m` takes the names it lists."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from mlxc.config import Settings
from mlxc.errors import ModelError
from mlxc.model.describe import describe_gguf
from mlxc.model.discover import find, scan
from mlxc.model.gguf_header import GGUFHeaderError, read_header
from mlxc.model.refs import resolve_model

gguf = pytest.importorskip("gguf")


def write_gguf(path, arch="qwen2"):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.context_length", 4096)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([f"t{i}" for i in range(300)])
    writer.add_tensor("token_embd.weight", np.zeros((300, 32), np.float32))
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def places(tmp_path, tiny_model, monkeypatch):
    """One tiny model in each layout, in folders of this test's own."""
    hf, lms, ollama = tmp_path / "hf", tmp_path / "lms", tmp_path / "ollama"
    monkeypatch.setenv("HF_HUB_CACHE", str(hf))
    monkeypatch.setenv("LMSTUDIO_MODELS", str(lms))
    monkeypatch.setenv("OLLAMA_MODELS", str(ollama))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("MLXC_MODEL_PATH", raising=False)
    repo = hf / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    blobs = repo / "blobs"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in tiny_model.iterdir():
        if f.is_file() and not f.name.startswith("."):
            shutil.copy(f, blobs / f.name)
            os.symlink(blobs / f.name, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    shutil.copytree(tiny_model, lms / "pub" / "tiny-mlx")
    write_gguf((lms / "pub" / "tiny-gguf").mkdir(parents=True) or
               lms / "pub" / "tiny-gguf" / "tiny-Q8.gguf")
    (ollama / "blobs").mkdir(parents=True)
    digest = "sha256-" + "ab" * 32
    write_gguf(ollama / "blobs" / digest)
    for tag, dig in (("1b", digest), ("broken", "sha256-" + "cd" * 32)):
        manifest = ollama / "manifests" / "registry.ollama.ai" / "library" / "tinyq" / tag
        manifest.parent.mkdir(parents=True, exist_ok=True)
        manifest.write_text(json.dumps({"layers": [
            {"mediaType": "application/vnd.ollama.image.model",
             "digest": dig.replace("-", ":")}]}))
    return Settings(models_dir=tmp_path / "mlxc-models", cache_dir=tmp_path / "cache")


def test_every_layout_is_listed_and_described(places):
    from mlxc.model.describe import describe_folder

    found = {(e.source, e.name): e for e in scan(places.models_dir)}
    assert set(found) == {("hf", "org/tiny"), ("lmstudio", "pub/tiny-mlx"),
                          ("lmstudio", "pub/tiny-gguf/tiny-Q8.gguf"),
                          ("ollama", "tinyq:1b"), ("ollama", "tinyq:broken")}
    info = describe_folder(found["hf", "org/tiny"].path)
    assert (info.architecture, info.context_length, info.runnable) == ("llama", 1024, True)
    assert info.parameters > 0 and info.size_bytes > 0
    info = describe_gguf(found["ollama", "tinyq:1b"].path)
    assert (info.architecture, info.context_length) == ("qwen2", 4096)
    assert info.parameters == 300 * 32 + 32 * 32
    assert "missing" not in str(found["ollama", "tinyq:1b"].problem)
    assert "names blob sha256-cdcd" in found["ollama", "tinyq:broken"].problem


def test_names_resolve_through_refs(places):
    ref = resolve_model("org/tiny", places)
    assert ref.source == "folder" and ref.is_ready and not ref.own
    assert resolve_model("pub/tiny-mlx", places).is_ready
    gguf_ref = resolve_model("tinyq:1b", places)
    assert gguf_ref.source == "gguf" and gguf_ref.folder.parent == places.models_dir
    assert resolve_model("pub/tiny-gguf", places).gguf.name == "tiny-Q8.gguf"  # the only one
    with pytest.raises(ModelError, match="names blob sha256-cdcd"):
        resolve_model("tinyq:broken", places)


def test_two_models_with_one_name_are_an_error_naming_both(places, tmp_path, tiny_model):
    shutil.copytree(tiny_model, tmp_path / "lms" / "org" / "tiny")
    with pytest.raises(ModelError, match="2 models are named 'org/tiny'.*hf:org/tiny"):
        resolve_model("org/tiny", places)
    assert find("lmstudio:org/tiny", places.models_dir).source == "lmstudio"


def test_damaged_ggufs_are_named_with_what_is_wrong(tmp_path):
    whole = write_gguf(tmp_path / "whole.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(whole[:-64])
    with pytest.raises(GGUFHeaderError, match="cut.gguf is truncated"):
        read_header(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(whole[:200])
    with pytest.raises(GGUFHeaderError, match="head.gguf: the header is damaged"):
        read_header(tmp_path / "head.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"x" * 100)
    assert "not a GGUF file" in describe_gguf(tmp_path / "junk.gguf").problems[0]
    info = describe_gguf(write_gguf(tmp_path / "g.gguf", arch="gemma9"))
    assert "architecture 'gemma9'" in info.problems[0]


def test_cli_lists_as_json_and_removes_only_its_own_copies(places, tmp_path, tiny_model):
    from conftest import run_mlxc

    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXC_")}
    env.update(MLXC_MODELS_DIR=str(places.models_dir), MLXC_CACHE_DIR=str(places.cache_dir))
    shutil.copytree(tiny_model, places.models_dir / "my-copy")
    extra = write_gguf(tmp_path / "extra" / "x.gguf") if (tmp_path / "extra").mkdir() is None \
        else None
    result = run_mlxc("models", "--json", "--path", str(extra.parent), env=env)
    assert result.returncode == 0, result.stderr
    rows = {(r["source"], r["name"]): r for r in json.loads(result.stdout)}
    assert rows["mlxc", "my-copy"]["runnable"] is True
    assert rows["path", "x.gguf"]["architecture"] == "qwen2"
    assert rows["ollama", "tinyq:broken"]["runnable"] is False
    refused = run_mlxc("models", "rm", "org/tiny", env=env)
    assert refused.returncode == 1 and "not a copy mlxc made" in refused.stderr
    assert (tmp_path / "hf" / "models--org--tiny" / "snapshots" / "abc123").is_dir()
    assert run_mlxc("models", "rm", "my-copy", env=env).returncode == 0
    assert not (places.models_dir / "my-copy").exists()

"""CPU speed-ups: loading an optimised BLAS before MLX, and dequantizing to float32.
Behaviour only (which library, which dtype, same logits); timings live in benchmarks/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mlxc.model import dtype as dtype_mod
from mlxc.model.dtype import choose_dtype

ROOT = Path(__file__).resolve().parent.parent
GB = 1024**3
SYSTEM_OPENBLAS = [
    f"{d}/{n}"
    for d in ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64")
    for n in ("openblas-pthread/libopenblas.so.0", "libopenblas.so.0", "libopenblasp.so.0")
]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux CPU wheel")

# Runs in a fresh process: the BLAS must be loaded before mlx.core is imported.
PROBE = """
import json, sys
from dataclasses import asdict
from mlxc.model.blas import blas_info, load_optimised_blas
first = load_optimised_blas()
assert load_optimised_blas() is first and blas_info() is first
out = asdict(first)
out["mlx_imported_by_loader"] = "mlx.core" in sys.modules
if "--matmul" in sys.argv:
    import mlx.core as mx
    a = mx.arange(12, dtype=mx.float32).reshape(3, 4)
    out["matmul"] = (a @ a.T).tolist()
with open("/proc/self/maps") as f:
    out["maps"] = f.read()
print(json.dumps(out))
"""


def probe(*args: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "MLXC_BLAS"}
    environ.update(env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, *args],
        env=environ, capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@linux_only
@pytest.mark.parametrize("value", ["none", "/nonexistent/libopenblas.so.0", "/etc/hostname"])
def test_blas_falls_back_to_bundled(value):
    info = probe(MLXC_BLAS=value)
    assert (info["name"], info["path"], info["source"]) == ("bundled", None, "bundled")
    assert info["note"]  # says why
    assert "openblas" not in info["maps"]


@linux_only
def test_blas_rejects_library_without_cblas():
    # libm is a real shared library without cblas_sgemm: refused, and nothing breaks.
    info = probe(MLXC_BLAS="libm.so.6")
    assert info["source"] == "bundled" and "cblas_sgemm" in info["note"]


@linux_only
@pytest.mark.skipif(
    not any(os.path.exists(p) for p in SYSTEM_OPENBLAS), reason="no system OpenBLAS"
)
def test_blas_finds_system_openblas():
    info = probe("--matmul")
    assert (info["name"], info["source"]) == ("openblas", "system")
    assert os.path.realpath(info["path"]) in info["maps"]
    assert not info["mlx_imported_by_loader"]
    a = [[float(4 * r + c) for c in range(4)] for r in range(3)]
    assert info["matmul"] == [[sum(x * y for x, y in zip(r, s, strict=True)) for s in a] for r in a]


@linux_only
def test_blas_after_mlx_import_is_bundled():
    code = "import mlx.core\nfrom mlxc.model.blas import load_optimised_blas\n"
    code += "print(load_optimised_blas().note)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    assert "imported first" in done.stdout, done.stderr


def test_choose_dtype_rules(monkeypatch):
    for explicit in ("float32", "bfloat16", "float16", "keep"):
        assert choose_dtype(explicit, 100 * GB) == explicit
    with pytest.raises(ValueError, match="unknown dtype"):
        choose_dtype("int8", 1)
    monkeypatch.setattr(dtype_mod, "gpu_backend", lambda: False)
    assert choose_dtype("auto", 1 * GB, ram_bytes=24 * GB) == "float32"
    assert choose_dtype("auto", 10 * GB, ram_bytes=24 * GB) == "keep"  # > 40% of RAM
    assert choose_dtype("auto", 1 * GB, ram_bytes=0) == "keep"  # RAM unknown
    monkeypatch.setattr(dtype_mod, "gpu_backend", lambda: True)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert choose_dtype("auto", 1, ram_bytes=24 * GB) == "keep"  # Metal: quantized is fast
    assert choose_dtype("auto", GB, scales_dtype="bfloat16", gpu_bytes=80 * GB) == "keep"
    monkeypatch.setattr(sys, "platform", "linux")  # CUDA: quantized batches barely gain
    h200 = 139 * GB
    assert choose_dtype("auto", 12 * GB, scales_dtype="bfloat16", gpu_bytes=h200) == "bfloat16"
    assert choose_dtype("auto", 12 * GB, scales_dtype="float32", gpu_bytes=h200) == "float32"
    assert choose_dtype("auto", 12 * GB, scales_dtype=None, gpu_bytes=h200) == "keep"  # plain
    assert choose_dtype("auto", 120 * GB, scales_dtype="bfloat16", gpu_bytes=h200) == "keep"
    assert choose_dtype("auto", 12 * GB, scales_dtype="bfloat16", gpu_bytes=0) == "keep"


def test_cuda_memory_is_asked_once_per_boot(tmp_path, monkeypatch):
    """The driver is slow to start and the cache-hit path needs the answer: it is kept in
    the cache folder, for this boot only."""
    import json

    asked = []
    monkeypatch.setattr(dtype_mod, "_cuda_driver_memory", lambda: asked.append(1) or 80 * GB)
    memory = dtype_mod.cuda_memory_bytes
    assert memory(tmp_path) == memory(tmp_path) == 80 * GB
    assert len(asked) == 1
    kept = json.loads((tmp_path / "cuda-memory.json").read_text())
    (tmp_path / "cuda-memory.json").write_text(json.dumps({**kept, "boot": "another boot"}))
    assert memory(tmp_path) == 80 * GB and len(asked) == 2


def test_scales_dtype_reads_the_safetensors_headers(tmp_path):
    import mlx.core as mx

    mx.save_safetensors(str(tmp_path / "model.safetensors"), {
        "layers.0.proj.weight": mx.zeros((4, 2), mx.uint32),
        "layers.0.proj.scales": mx.zeros((4, 1), mx.bfloat16),
    })
    assert dtype_mod.scales_dtype(tmp_path) == "bfloat16"
    mx.save_safetensors(str(tmp_path / "model.safetensors"), {"w": mx.zeros((2,), mx.float16)})
    assert dtype_mod.scales_dtype(tmp_path) is None


def test_gpu_backend_on_macos(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert dtype_mod.gpu_backend()


@pytest.mark.parametrize("folder, cuda", [("mlx_cuda_13-0.32.4.dist-info", True),
                                          ("mlx_cuda-0.30.0.dist-info", True),
                                          ("mlx_cpu-0.32.4.dist-info", False)])
def test_a_cuda_build_of_mlx_is_found_by_its_dist_info(folder, cuda, tmp_path, monkeypatch):
    (tmp_path / folder).mkdir()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(sys, "path", [str(tmp_path / "gone"), str(tmp_path)])
    dtype_mod._cuda_build_installed.cache_clear()
    try:
        assert dtype_mod.gpu_backend() is cuda
    finally:
        dtype_mod._cuda_build_installed.cache_clear()


@pytest.fixture(scope="module")
def quantized_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny llama quantized like SmolLM2's GGUF: 4-bit group 32, embedding 8-bit."""
    import mlx.nn as nn
    from mlx_lm import load
    from mlx_lm.utils import save_config, save_model

    model, _ = load(str(tiny_model))
    nn.quantize(model, class_predicate=lambda path, m: _bits(path) if hasattr(m, "to_quantized")
                else False)  # fmt: skip
    folder = tmp_path_factory.mktemp("quantized") / "tiny-q"
    folder.mkdir()
    for f in tiny_model.iterdir():
        if not f.name.endswith(".safetensors") and f.is_file():
            (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((tiny_model / "config.json").read_text())
    config["quantization"] = {"group_size": 32, "bits": 4, "model.embed_tokens": _bits("embed")}
    save_model(folder, model)
    save_config(config, folder / "config.json")
    return folder


def _bits(path: str) -> dict:
    return {"group_size": 32, "bits": 8 if "embed" in path else 4}


def test_float32_size_from_headers_without_mlx(tiny_model, quantized_model):
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(tiny_model))
    expected = 4 * sum(v.size for _, v in tree_flatten(model.parameters()))
    code = (
        "import sys\nfrom pathlib import Path\nfrom mlxc.model import dtype\n"
        f"print(dtype.float32_bytes(Path({str(quantized_model)!r})),"
        f" dtype.effective_dtype_without_mlx('auto', Path({str(quantized_model)!r})),"
        " any(m.startswith('mlx.') or m == 'mlx' for m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT
    )
    size, effective, imported_mlx = done.stdout.split()
    assert int(size) == expected
    assert effective == ("keep" if dtype_mod.gpu_backend() else "float32")
    assert imported_mlx == "False"


def test_apply_dtype_dequantizes_exactly(quantized_model):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    model, _ = load(str(quantized_model))
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    tokens = mx.array([[1, 5, 9, 42, 7, 3, 100, 64]])
    before = model(tokens)
    dtype_mod.apply_dtype(model, "keep")
    assert isinstance(model.model.layers[0].mlp.up_proj, nn.QuantizedLinear)

    dtype_mod.apply_dtype(model, "float32")
    kinds = {type(m) for _, m in model.named_modules()}
    assert not kinds & {nn.QuantizedLinear, nn.QuantizedEmbedding}
    assert type(model.model.embed_tokens) is nn.Embedding  # tied head uses its as_linear
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {mx.float32}
    after = model(tokens)
    diff = mx.abs(after - before.astype(mx.float32)).max().item()
    assert diff < 1e-4 * max(1.0, mx.abs(before).max().item()), diff


def test_apply_dtype_keeps_bias_and_casts():
    import mlx.core as mx
    import mlx.nn as nn

    mx.random.seed(1)
    model = nn.Sequential(nn.Linear(64, 32, bias=True), nn.LayerNorm(32))
    model.layers[0].bias = mx.random.normal((32,))
    nn.quantize(model, group_size=32, bits=4)
    x = mx.random.normal((2, 64))
    before = model(x)
    dtype_mod.apply_dtype(model, "bfloat16")
    layer = model.layers[0]
    assert type(layer) is nn.Linear and "bias" in layer
    assert layer.weight.dtype == layer.bias.dtype == model.layers[1].weight.dtype == mx.bfloat16
    after = model(x.astype(mx.bfloat16)).astype(mx.float32)
    assert mx.abs(after - before).max().item() < 0.1
    with pytest.raises(ValueError):
        dtype_mod.apply_dtype(model, "int4")


def test_cpu_speed_benchmark_runs(quantized_model):
    # The benchmark script itself, kept from rotting: tiny sizes, two setups, JSON out.
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "cpu_speed.py"), "--model", str(quantized_model),
         "--setups", "naive,auto", "--lengths", "8,16", "--decode", "4", "--answer-tokens", "4",
         "--steps", "8,16", "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    naive, auto = json.loads(done.stdout)
    assert (naive["blas"], naive["dtype"]) == ("bundled", "keep")
    assert auto["dtype"] == choose_dtype("auto", 1)
    assert set(auto["prefill_tps"]) == {"8", "16"} and set(auto["step_tps"]) == {"8", "16"}
    assert auto["answers"] == naive["answers"]  # dequantizing must not change greedy output

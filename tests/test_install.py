"""The package's install, as scripts/install.sh runs it: an editable pip install."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_editable_install_is_quiet(tmp_path):
    """setuptools' 10-line "!!" box about same-named folders came with every install; the
    build runs as pip runs it (isolated, the pinned setuptools) on a copy of the layout."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "mlxc", project / "mlxc", ignore=shutil.ignore_patterns("__py*"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False)  # pip runs from here with --python: no pip install
    python = env_dir / "bin" / "python"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
         "--disable-pip-version-check", "-e", str(project)],
        capture_output=True, text=True, timeout=120,
    )
    if done.returncode != 0 and "setuptools" in done.stderr and "No matching" in done.stderr:
        pytest.skip(f"no package index for the build's setuptools: {done.stderr[-300:]}")
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "!!" not in output and "Editable installation" not in output, output
    # Still an editable install of this folder: the package is imported from the project.
    found = subprocess.run(
        [str(python), "-c", "import mlxc; print(mlxc.__file__)"],
        capture_output=True, text=True, timeout=30, cwd=tmp_path,  # not this checkout's
    )
    assert found.stdout.strip() == str(project / "mlxc" / "__init__.py"), found.stderr

"""completions/ holds what the app generates, and the bash script really completes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
from gen_completions import FILES, generate  # noqa: E402


@pytest.mark.parametrize("shell", sorted(FILES))
def test_scripts_match_the_app(shell):
    path = ROOT / "completions" / FILES[shell]
    assert path.read_text() == generate(shell), (
        f"{path.name} is stale: run python scripts/gen_completions.py"
    )


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
@pytest.mark.parametrize(
    ("words", "expected"),
    [("mlxc b", "bench"), ("mlxc cache w", "warm"), ("mlxc bench --pl", "--plot"),
     ("mlxc cache warm --str", "--strict")],
)
def test_bash_completes_commands_and_options(words, expected):
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "mlxc").exists():
        pytest.skip("the mlxc entry point is not installed next to this python")
    script = (
        f"source {ROOT / 'completions' / FILES['bash']}\n"
        f"COMP_WORDS=({words}); COMP_CWORD={len(words.split()) - 1}\n"
        "_mlxc_completion mlxc\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(Path.home())}
    result = subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True)
    assert expected in result.stdout.split(), result.stdout + result.stderr

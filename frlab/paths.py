"""Where frlab writes: run folders and the model cache, never inside the installed package.

    paths.home()            # $FRLAB_HOME, else the workbook folder you work in, else the working directory
    paths.runs()            # <home>/runs: one folder per notebook run
    paths.cache("models")   # <home>/cache/models: trained models, keyed by what determines them

The workbook folder is the nearest one, from the working directory up, that holds a `notebooks/`
folder: a notebook opened in JupyterLab (whose working directory is notebooks/) and the runner
(started from the repository root) write to the same runs/ and cache/.
"""

from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    if os.environ.get("FRLAB_HOME"):
        return Path(os.environ["FRLAB_HOME"]).expanduser().resolve()
    cwd = Path.cwd().resolve()
    for folder in (cwd, *cwd.parents):
        if (folder / "notebooks").is_dir():
            return folder
    return cwd


def runs() -> Path:
    return home() / "runs"


def cache(kind: str) -> Path:
    return home() / "cache" / kind

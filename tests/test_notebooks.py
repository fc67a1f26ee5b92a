"""Every notebook, executed headless at its smoke parameters, exactly as a user would run it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_at_smoke_parameters(path, tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "frlab", "run", path.stem, "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    (run_dir,) = (tmp_path / path.stem).iterdir()
    params = json.loads((run_dir / "params.json").read_text())
    assert params["status"] == "ok" and params["smoke"] is True
    assert {"torch", "python", "frlab"} <= set(params["versions"]) and params["seed"] is not None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["headline"], "a notebook reports headline metrics"
    assert any((run_dir / "figures").glob("*.png")), "a notebook saves its figures"
    assert (run_dir / path.name).exists()

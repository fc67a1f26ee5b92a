"""`python -m frlab sweep`: the grid, its checks before anything runs, reuse of finished runs, the table."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import terminal

from frlab import sweep
from frlab.params import ParameterError

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, sleep=0.0):
    source = [
        "x: float = 1.0\nseed: int = 0\nfmr: list[float] = [0.1]\n"
        'check_claims: bool = True  # smoke: False\nrun_dir: str = ""',
        f"import time\nimport frlab\ntime.sleep({sleep})\nrun = frlab.Run(run_dir, '01_tiny', check_claims)\n"
        "if x < 0:\n    raise ValueError('x must be >= 0')\n"
        "run.log(headline=True, y=2 * x + seed, n=len(fmr))\nrun.claim('y is positive', 2 * x + seed > 0)",
    ]
    cells = [
        {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": [s]}
        for i, s in enumerate(source)
    ]
    cells[0]["metadata"] = {"tags": ["parameters"]}
    nb = {
        "cells": cells,
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }
    path = tmp_path / "01_tiny.ipynb"
    path.write_text(json.dumps(nb))
    return path


def test_values_split_at_the_top_level_and_are_checked_before_anything_runs(tmp_path):
    assert sweep.split_values("0, 1,2") == ["0", "1", "2"]
    assert sweep.split_values("[0.1,0.2],[0.3]") == ["[0.1,0.2]", "[0.3]"]
    nb = tiny(tmp_path)
    names, points = sweep.grid(nb, [("seed", "0,1"), ("x", "1,2.5"), ("fmr", "[0.1],[0.1,0.01]")])
    assert names == ["seed", "x", "fmr"] and len(points) == 8
    assert points[0] == {"seed": 0, "x": 1.0, "fmr": [0.1]} and points[-1] == {"seed": 1, "x": 2.5, "fmr": [0.1, 0.01]}
    for axes, message in (
        ([("seed", "0,one")], "not a valid int"),
        ([("y", "1")], "not a parameter"),
        ([("fmr", "0.1,0.2")], "in brackets"),
        ([("seed", "0"), ("seed", "1")], "swept twice"),
        ([("seed", "[0,1")], "comma-separated"),
    ):
        with pytest.raises(ParameterError, match=message):
            sweep.grid(nb, axes)


def test_a_sweep_runs_every_point_reuses_finished_ones_and_tabulates(tmp_path):
    nb, out = tiny(tmp_path), tmp_path / "runs"
    table, summary, folder = sweep.sweep(str(nb), [("seed", "0,1"), ("x", "1,2")], jobs=2, out=out, progress=False)
    assert len(table) == 4 and (table["status"] == "ok").all() and not table["reused"].any()
    assert (table["y"] == 2 * table["x"] + table["seed"]).all()
    by_x = summary.set_index("x")
    assert by_x.loc[1.0, "y mean"] == pytest.approx(2.5) and by_x.loc[2.0, "y std"] == pytest.approx(2**-0.5)
    assert (by_x["runs"] == 2).all() and (by_x["claims held mean"] == 1).all()
    assert (folder / "summary.png").exists() and pd.read_csv(folder / "runs.csv").shape[0] == 4
    # one more seed: the four finished points are reused (an interrupted sweep resumes the same way)
    table, _, _ = sweep.sweep(str(nb), [("seed", "0,1,2"), ("x", "1,2")], jobs=2, out=out, progress=False)
    assert table["reused"].sum() == 4 and len(table) == 6
    assert len(list((out / "01_tiny").glob("*/params.json"))) == 6


def test_a_failing_point_is_reported_and_the_others_kept(tmp_path):
    nb, out = tiny(tmp_path), tmp_path / "runs"
    r = subprocess.run(
        [sys.executable, "-m", "frlab", "sweep", str(nb), "-p", "x", "1,-1", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )
    assert r.returncode == 1
    assert "2 points (0 reused, 1 failed)" in r.stdout and "x must be >= 0" in r.stderr
    (table,) = [pd.read_csv(p) for p in (out / "sweeps" / "01_tiny").glob("*/runs.csv")]
    assert list(table["status"]) == ["ok", "failed"]
    r = subprocess.run(
        [sys.executable, "-m", "frlab", "sweep", str(nb), "-p", "x", "1,oops"], capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2 and r.stderr.startswith("error: x='oops' is not a valid float")


def test_a_sweep_runs_on_a_dask_cluster(tmp_path):
    distributed = pytest.importorskip("distributed")
    nb, out = tiny(tmp_path), tmp_path / "runs"
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        table, summary, _ = sweep.sweep(
            str(nb), [("x", "1,3")], out=out, progress=False, scheduler=cluster.scheduler_address
        )
    assert list(table["status"]) == ["ok", "ok"] and list(table["y"]) == [2.0, 6.0]
    again, _, _ = sweep.sweep(str(nb), [("x", "1,3")], out=out, progress=False)  # the cluster's runs are reused here
    assert again["reused"].all()


def test_the_readme_block_shows_the_newest_full_sweep_with_its_command(tmp_path):
    from frlab import report

    nb, out = tiny(tmp_path), tmp_path / "runs"
    assert report.latest_sweep(out) is None
    r = subprocess.run(
        [sys.executable, "-m", "frlab", "sweep", str(nb), "-p", "seed", "0,1", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    block = report.latest_sweep(out)
    assert block.startswith(f"`python -m frlab sweep {nb} -p seed 0,1 --out {out}`") and "2 runs" in block
    assert "| runs |" in block and "y mean" in block
    smoke = subprocess.run(
        [sys.executable, "-m", "frlab", "sweep", str(nb), "-p", "seed", "3", "--smoke", "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert smoke.returncode == 0 and report.latest_sweep(out) == block  # smoke sweeps are not results


def test_ctrl_c_stops_the_sweep_at_once_and_starts_no_new_point(tmp_path):
    import time

    nb, out = tiny(tmp_path, sleep=20.0), tmp_path / "runs"
    cmd = [sys.executable, "-m", "frlab", "sweep", str(nb), "-p", "seed", "0,1,2,3", "--jobs", "2", "--out", str(out)]
    proc = terminal.start(cmd)
    deadline = time.time() + 120
    while len(list(out.glob("01_tiny/*/params.json"))) < 2 and time.time() < deadline:
        time.sleep(0.5)
    time.sleep(3)  # both points' kernels are in their sleep
    start = time.time()
    terminal.ctrl_c(proc)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and time.time() - start < 60
    assert "interrupted: the finished points are kept" in err and "Traceback" not in err
    statuses = [json.loads(p.read_text()).get("status") for p in out.glob("01_tiny/*/params.json")]
    assert sorted(statuses) == ["interrupted", "interrupted"]  # no new point started after Ctrl-C

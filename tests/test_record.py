"""Run folders, claims, tables and findings; the report generated from them; where frlab writes."""

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from frlab import paths, report
from frlab.record import ClaimFailed, Run

ROOT = Path(__file__).resolve().parents[1]


def test_claims_are_checked_or_only_recorded(tmp_path, capsys):
    run = Run(tmp_path / "a", "x")
    assert run.claim("holds", True, "1 > 0")
    with pytest.raises(ClaimFailed, match="fails: 0 > 1"):
        run.claim("fails", False, "0 > 1")
    quiet = Run(tmp_path / "b", "x", check_claims=False)
    assert not quiet.claim("fails", False, "0 > 1")  # reported, not raised
    out = capsys.readouterr().out
    assert (
        "not checked in this run (check_claims=False)" in out
        and "claim does NOT hold (not checked): fails (0 > 1)" in out
    )
    claims = json.loads((tmp_path / "b" / "metrics.json").read_text())["claims"]
    assert claims == {"fails": {"held": False, "checked": False, "detail": "0 > 1"}}
    assert json.loads((tmp_path / "a" / "metrics.json").read_text())["claims"]["fails"]["checked"] is True


def test_tables_and_findings_are_recorded(tmp_path):
    run = Run(tmp_path, "x")
    frame = pd.DataFrame({"AUC": [0.9, float("nan")], "n": [3, 4]}, index=pd.Index(["a", "b"], name="model"))
    run.table("t", frame, "a caption")
    run.finding("a is ahead")
    body = json.loads((tmp_path / "metrics.json").read_text())
    assert body["tables"]["t"] == {
        "caption": "a caption",
        "floatfmt": ".3f",
        "columns": ["model", "AUC", "n"],
        "rows": [["a", 0.9, 3], ["b", None, 4]],
    }
    assert body["findings"] == ["a is ahead"]
    assert report.markdown_table(body["tables"]["t"]).splitlines() == [
        "| model | AUC | n |",
        "|---|---|---|",
        "| a | 0.900 | 3 |",
        "| b | - | 4 |",
    ]


def fake_run(root, stem, started, smoke=False, status="ok", auc=0.9):
    d = root / stem / started
    d.mkdir(parents=True)
    meta = {
        "notebook": f"{stem}.ipynb",
        "smoke": smoke,
        "status": status,
        "started": started,
        "wall_s": 120.0,
        "git_commit": "abc123def456",
        "parameters": {"epochs": 8, "seed": 1, "run_dir": str(d)},
        "versions": {"platform": "Linux-6.1-x86_64-with-glibc2.36", "torch": "2.13.0+cpu"},
    }
    (d / "params.json").write_text(json.dumps(meta))
    run = Run(d, stem, check_claims=False)
    run.table("t", pd.DataFrame({"AUC": [auc]}, index=pd.Index(["m"], name="model")))
    run.finding(f"AUC {auc}")
    run.claim("AUC above 0.5", auc > 0.5, f"{auc}")
    return d


def test_report_takes_the_latest_finished_full_run_of_each_notebook(tmp_path):
    nb = tmp_path / "notebooks" / "00_demo.ipynb"
    nb.parent.mkdir()
    nb.write_text(
        json.dumps(
            {
                "cells": [
                    {
                        "cell_type": "code",
                        "metadata": {"tags": ["parameters"]},
                        "outputs": [],
                        "source": ["epochs: int = 8\n", "seed: int = 0\n", 'run_dir: str = ""'],
                    }
                ],
                "metadata": {},
                "nbformat": 4,
                "nbformat_minor": 5,
            }
        )
    )
    runs = tmp_path / "runs"
    fake_run(runs, "00_demo", "2026-12-01T10:00:00", auc=0.7)
    fake_run(runs, "00_demo", "2026-12-01T11:00:00", auc=0.8)
    fake_run(runs, "00_demo", "2026-12-01T12:00:00", smoke=True, auc=0.1)
    fake_run(runs, "00_demo", "2026-12-01T13:00:00", status="failed", auc=0.2)
    text = report.build(runs, [nb])
    assert (
        "run 2026-12-01 11:00 at commit `abc123def4`" in text and "2.0 min" in text and "parameters: seed = 1" in text
    )
    assert (
        "| m | 0.800 |" in text
        and "- AUC 0.8" in text
        and "- holds: AUC above 0.5 (0.8)" in text
        and "Claims (evaluated, not checked)" in text
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.BEGIN}\nSTALE\n{report.END}\n\nafter\n")
    r = subprocess.run(
        [sys.executable, "-m", "frlab", "report", "--runs", str(runs), "--readme", str(readme)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**__import__("os").environ, "FRLAB_HOME": str(tmp_path)},
    )
    assert r.returncode == 0, r.stderr
    new = readme.read_text()
    assert "STALE" not in new and "| m | 0.800 |" in new and new.endswith("after\n") and (runs / "results.md").exists()
    with pytest.raises(ValueError, match="no block"):
        report.replace_block("# no markers\n", "body")
    # a run at the defaults (a sweep's first point, say) is preferred to a newer one that is not
    at_defaults = fake_run(runs, "00_demo", "2026-12-01T14:00:00", auc=0.9)
    meta = json.loads((at_defaults / "params.json").read_text())
    meta["parameters"]["seed"] = 0
    (at_defaults / "params.json").write_text(json.dumps(meta))
    fake_run(runs, "00_demo", "2026-12-01T15:00:00", auc=0.6)  # seed 1: not the defaults
    text = report.build(runs, [nb])
    assert "run 2026-12-01 14:00" in text and "parameters: the defaults" in text
    # --keep: a notebook without a run here keeps its README section; one with a run gets it anew
    other = tmp_path / "01_other.ipynb"
    other.write_text(nb.read_text())
    kept = "**01_other**: run 2026-11-30 09:00 at commit `0123456789`, 1.0 min.\n\n- held elsewhere\n"
    readme.write_text(f"# x\n\n{report.BEGIN}\n\n**00_demo**: STALE\n\n{kept}\n{report.END}\n")
    assert report.sections(readme.read_text()) == {"00_demo": "**00_demo**: STALE\n", "01_other": kept}
    text = report.build(runs, [nb, other], report.sections(readme.read_text()))
    assert "STALE" not in text and "run 2026-12-01 14:00" in text and kept in text
    assert "no finished full run" in report.build(runs, [nb, other])


def test_frlab_writes_under_its_home_never_inside_the_package(tmp_path, monkeypatch):
    monkeypatch.delenv("FRLAB_HOME", raising=False)
    monkeypatch.chdir(ROOT / "notebooks")  # where JupyterLab runs a notebook: the workbook is one up
    assert paths.home() == ROOT and paths.runs() == ROOT / "runs" and paths.cache("models") == ROOT / "cache" / "models"
    monkeypatch.chdir(tmp_path)  # no workbook around: the working directory
    assert paths.home() == tmp_path.resolve()
    monkeypatch.setenv("FRLAB_HOME", str(tmp_path / "home"))
    assert paths.runs() == (tmp_path / "home" / "runs").resolve()
    run = Run("", "00_demo")
    assert run.dir.parent == (tmp_path / "home" / "runs" / "00_demo").resolve()

"""Where a notebook writes what it found: metrics.json and figures/ in its run folder.

    run = Run(run_dir, "00_quickstart", check_claims)  # both from the parameters cell
    run.log(auc=0.97, headline=True)       # headline metrics go into runs/summary.md
    run.table("heads", frame, "held-out identities, mean over seeds")   # a table for the report
    run.savefig(fig, "similarities")       # figures/similarities.png, shown once
    run.claim("training separates identities", auc > before + 0.05, f"AUC {before:.3f} -> {auc:.3f}")

A claim is what the notebook says its paper shows, checked on the numbers it just produced. With
`check_claims=False` (smoke runs: too short to learn anything) a claim is evaluated and reported,
but a failing one does not stop the run; either way it is recorded in metrics.json.

Interactively (run_dir == "") a fresh folder runs/<name>/interactive-<time>/ is made (see
`frlab.paths`), so a notebook behaves the same in Jupyter and under the runner.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

from . import paths


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _plain(v: Any) -> Any:
    """Tensors, numpy scalars and arrays to JSON-friendly Python values."""
    if hasattr(v, "tolist"):
        v = v.tolist()
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class ClaimFailed(AssertionError):
    """A notebook's claim did not hold on the data it produced."""


class Run:
    def __init__(self, run_dir: str | Path = "", name: str = "interactive", check_claims: bool = True):
        if not run_dir:
            run_dir = paths.runs() / name / time.strftime("interactive-%Y%m%d-%H%M%S")
        self.dir = Path(run_dir)
        self.figures = self.dir / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.check_claims = bool(check_claims)
        self.metrics: dict[str, Any] = {}
        self.headline: dict[str, Any] = {}
        self.claims: dict[str, dict[str, Any]] = {}
        self.tables: dict[str, dict[str, Any]] = {}
        self.findings: list[str] = []
        if not self.check_claims:
            print("claims are evaluated but not checked in this run (check_claims=False)")

    def _write(self) -> None:
        tmp = self.dir / "metrics.json.tmp"
        body = {
            "headline": self.headline,
            "metrics": self.metrics,
            "claims": self.claims,
            "tables": self.tables,
            "findings": self.findings,
        }
        tmp.write_text(json.dumps(body, indent=2) + "\n")
        os.replace(tmp, self.dir / "metrics.json")

    def log(self, headline: bool = False, **metrics: Any) -> None:
        """Record metrics (and write metrics.json at once, so a crash loses nothing)."""
        metrics = _plain(metrics)
        self.metrics.update(metrics)
        if headline:
            self.headline.update(metrics)
        self._write()

    def table(self, name: str, frame, caption: str = "", floatfmt: str = ".3f") -> None:
        """Record a table (a pandas DataFrame; its index becomes the first column) for the report."""
        import pandas as pd

        if not isinstance(frame.index, pd.RangeIndex):
            frame = frame.reset_index()
        self.tables[name] = {
            "caption": caption,
            "floatfmt": floatfmt,
            "columns": [str(c) for c in frame.columns],
            "rows": _plain(frame.astype(object).where(frame.notna(), None).values.tolist()),
        }
        self._write()

    def finding(self, text: str) -> None:
        """Record (and print) a sentence about this run's numbers, for the report."""
        self.findings.append(text)
        print(text)
        self._write()

    def claim(self, name: str, held: bool, detail: str = "") -> bool:
        """Check one claim (raises ClaimFailed if it does not hold and claims are checked)."""
        held = bool(held)
        self.claims[name] = {"held": held, "checked": self.check_claims, "detail": detail}
        self._write()
        verdict = "holds" if held else "does NOT hold"
        print(
            f"claim {verdict}{'' if self.check_claims else ' (not checked)'}: {name}"
            + (f" ({detail})" if detail else "")
        )
        if self.check_claims and not held:
            raise ClaimFailed(f"{name}" + (f": {detail}" if detail else ""))
        return held

    def savefig(self, fig, name: str) -> None:
        """Save a matplotlib figure as figures/<name>.png, show it once in the notebook, and close it."""
        import matplotlib.pyplot as plt

        fig.savefig(self.figures / f"{name}.png", dpi=110, bbox_inches="tight")
        try:
            from IPython import get_ipython
            from IPython.display import display

            if get_ipython() is not None:
                display(fig)
        finally:
            plt.close(fig)

    def path(self, name: str) -> Path:
        return self.dir / name

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

"""Where a notebook writes what it found: metrics.json and figures/ in its run folder.

    run = Run(run_dir, "00_quickstart")    # run_dir comes from the parameters cell
    run.log(auc=0.97, headline=True)       # headline metrics go into runs/summary.md
    run.savefig(fig, "similarities")       # figures/similarities.png

Interactively (run_dir == "") a fresh folder runs/<name>/interactive-<time>/ is made, so a
notebook behaves the same in Jupyter and under the runner.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


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


class Run:
    def __init__(self, run_dir: str | Path = "", name: str = "interactive"):
        if not run_dir:
            run_dir = REPO / "runs" / name / time.strftime("interactive-%Y%m%d-%H%M%S")
        self.dir = Path(run_dir)
        self.figures = self.dir / "figures"
        self.figures.mkdir(parents=True, exist_ok=True)
        self.metrics: dict[str, Any] = {}
        self.headline: dict[str, Any] = {}

    def log(self, headline: bool = False, **metrics: Any) -> None:
        """Record metrics (and write metrics.json at once, so a crash loses nothing)."""
        metrics = _plain(metrics)
        self.metrics.update(metrics)
        if headline:
            self.headline.update(metrics)
        tmp = self.dir / "metrics.json.tmp"
        tmp.write_text(json.dumps({"headline": self.headline, "metrics": self.metrics}, indent=2) + "\n")
        os.replace(tmp, self.dir / "metrics.json")

    def savefig(self, fig, name: str):
        """Save a matplotlib figure as figures/<name>.png and return it (so a cell still shows it)."""
        fig.savefig(self.figures / f"{name}.png", dpi=110, bbox_inches="tight")
        return fig

    def path(self, name: str) -> Path:
        return self.dir / name

    def __repr__(self) -> str:
        return f"Run({str(self.dir)!r})"

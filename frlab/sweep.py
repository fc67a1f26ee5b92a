"""`python -m frlab sweep`: one notebook over a grid of parameters, and one table of every run.

    python -m frlab sweep 04_ddl -p seed 0,1,2 -p finetune_lr 0.01,0.05 [--jobs 2] [--smoke] [--out DIR]

Each point of the grid (every combination of the values given; a list parameter's values in
brackets: `-p fmr_levels [1e-2],[1e-2,1e-3]`) is one `python -m frlab run` of the notebook, with
its own run folder. A point that has already run with the same parameters and the same code (the
notebook's and frlab's source, digested into each run's params.json) is reused, not run again: an
interrupted sweep, started again, resumes where it stopped and loses no finished run. With
`--jobs N`, N points run at once, each in its own process with a share of the cores; with
`--scheduler ADDRESS` they run on the workers of a Dask cluster (the optional `dask` extra; the
workers must see the workbook at the same path).

The sweep writes runs/sweeps/<notebook>/<time>/: `runs.csv` (one row per point: the swept values,
status, run folder, reused or not, and every scalar metric the notebook logged), `summary.csv` and
`summary.md` (mean and standard deviation over `seed` per setting of the other swept parameters)
and `summary.png` (each headline metric against the first swept parameter other than the seed).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import paths
from .params import ParameterError, coerce, parameters_cell, parse_parameters
from .report import markdown_table


def split_values(text: str) -> list[str]:
    """Comma-separated values at the top level (commas inside brackets belong to a list value)."""
    out, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    values = [v.strip() for v in out if v.strip()]
    if not values or depth != 0:
        raise ParameterError(f"{text!r} is not a comma-separated list of values")
    return values


def grid(notebook: Path, axes: list[tuple[str, str]]) -> tuple[list[str], list[dict[str, Any]]]:
    """(the swept names, one dict of their values per point), every value checked against the
    notebook's declared types before anything runs."""
    params = parse_parameters(parameters_cell(json.loads(notebook.read_text())))
    names, choices = [], []
    for name, text in axes:
        if name in names:
            raise ParameterError(f"{name} is swept twice; give all its values in one -p")
        if name in params and params[name].type.startswith("list[") and not text.strip().startswith("["):
            raise ParameterError(f"{name} is a list: give each value in brackets, e.g. -p {name} [1,2],[3]")
        names.append(name)
        choices.append([coerce(params, name, v) for v in split_values(text)])
    return names, [dict(zip(names, point)) for point in itertools.product(*choices)]


def _arg(value: Any) -> str:
    """A value as `frlab run -p` reads it back."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + ",".join(_arg(v) for v in value) + "]"
    return value if isinstance(value, str) else repr(value)


def find_run(out: Path, notebook: Path, values: dict[str, Any], smoke: bool, digest: str) -> Path | None:
    """The newest finished (status ok) run of `notebook` under `out` with these parameter values
    (the rest at the defaults, or at the smoke values), the same smoke flag and the same code digest."""
    from .runner import plan

    planned = plan(notebook, [(k, _arg(v)) for k, v in values.items()], smoke).values
    want = {k: v for k, v in planned.items() if k != "run_dir"}
    best = None
    for p in sorted((out / notebook.stem).glob("*/params.json")):
        try:
            meta = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        got = {k: v for k, v in meta.get("parameters", {}).items() if k != "run_dir"}
        same_code = meta.get("code_digest") == digest
        if meta.get("status") == "ok" and meta.get("smoke") == smoke and same_code and got == want:
            best = p.parent
    return best


class _Running:
    """The points' processes a sweep has running, so that Ctrl-C can be passed on to them; once
    interrupted, no new point starts (a worker thread between two points cannot slip one in)."""

    def __init__(self):
        self.lock, self.procs, self.stopped = threading.Lock(), set(), False

    def start(self, cmd: list[str], **kw) -> subprocess.Popen | None:
        with self.lock:
            if self.stopped:
                return None
            proc = subprocess.Popen(cmd, **kw)
            self.procs.add(proc)
            return proc

    def finished(self, proc: subprocess.Popen) -> None:
        with self.lock:
            self.procs.discard(proc)

    def interrupt(self, timeout_s: float = 60.0) -> None:
        """Pass Ctrl-C on to every running point (each marks its run folder interrupted) and wait."""
        with self.lock:
            self.stopped, procs = True, list(self.procs)
        for proc in procs:
            proc.send_signal(signal.SIGINT)
        for proc in procs:
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()


def run_point(
    notebook: Path, values: dict[str, Any], smoke: bool, out: Path, threads: int | None, running: _Running | None = None
) -> tuple[Path | None, str]:
    """Run one point in its own process (`threads` per process; None: the machine's default),
    registered with `running` where given; (its run folder, "" or the error)."""
    stem = notebook.stem
    cmd = [sys.executable, "-m", "frlab", "run", str(notebook), "--out", str(out)]
    for k, v in values.items():
        cmd += ["-p", k, _arg(v)]
    if smoke:
        cmd.append("--smoke")
    env = dict(os.environ)
    if threads is not None:
        env |= {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    # its own session: a terminal's Ctrl-C reaches the sweep, which passes it on once
    kw = dict(stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    proc = running.start(cmd, **kw) if running is not None else subprocess.Popen(cmd, **kw)
    if proc is None:
        return None, "interrupted before it started"
    try:
        stdout, stderr = proc.communicate()
    finally:
        if running is not None:
            running.finished(proc)
    folder = None
    for line in stdout.splitlines():
        if " -> " in line and f"{stem}:" in line:
            folder = Path(line.rsplit(" -> ", 1)[1].strip())
    error = "" if proc.returncode == 0 else (stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
    return folder, error


def scalars(run_dir: Path | None) -> dict[str, Any]:
    """Every scalar metric a run logged, and how many of its claims held."""
    if run_dir is None or not (run_dir / "metrics.json").exists():
        return {}
    m = json.loads((run_dir / "metrics.json").read_text())
    out = {k: v for k, v in m.get("metrics", {}).items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    claims = m.get("claims", {})
    if claims:
        out["claims held"] = sum(c["held"] for c in claims.values())
        out["claims"] = len(claims)
    return out


def sweep(
    stem: str,
    axes: list[tuple[str, str]],
    smoke: bool = False,
    jobs: int = 1,
    out: Path | None = None,
    progress: bool = True,
    scheduler: str | None = None,
) -> tuple:
    """Run (or reuse) every point of the grid; returns (the runs table, the summary, the sweep folder).
    With `scheduler` (a Dask scheduler's address) the points run on its workers instead, each a
    `frlab run` process there: the workers must see the workbook and `out` at the same paths."""
    import pandas as pd
    from tqdm.auto import tqdm

    from .runner import code_digest, resolve

    notebook = resolve(stem)
    stem = notebook.stem
    names, points = grid(notebook, axes)
    out = (out or paths.runs()).resolve()
    digest = code_digest(notebook)
    if jobs < 1:
        raise ParameterError(f"--jobs must be >= 1, got {jobs}")
    threads = max(1, (os.cpu_count() or 1) // jobs)
    rows: list[dict[str, Any] | None] = [None] * len(points)
    todo = []
    for i, values in enumerate(points):
        found = find_run(out, notebook, values, smoke, digest)
        if found is not None:
            rows[i] = {**values, "status": "ok", "reused": True, "run": str(found), **scalars(found)}
        else:
            todo.append(i)
    bar = tqdm(total=len(points), initial=len(points) - len(todo), desc=f"sweep {stem}", disable=not progress)

    def record(i, folder, error):
        status = "failed" if error else "ok"
        return {
            **points[i],
            "status": status,
            "reused": False,
            "run": str(folder or ""),
            "error": error,
            **scalars(folder),
        }

    running = _Running()

    def one(i):
        rows[i] = record(i, *run_point(notebook, points[i], smoke, out, threads, running))
        bar.update(1)

    if scheduler:
        from distributed import Client  # the optional `dask` extra

        with Client(scheduler) as client:
            futures = {i: client.submit(run_point, notebook, points[i], smoke, out, None, pure=False) for i in todo}
            for i, future in futures.items():
                folder, error = future.result()
                rows[i] = record(i, folder, error)
                bar.update(1)
    else:
        pool = ThreadPoolExecutor(max_workers=jobs)
        try:
            list(pool.map(one, todo))
        except KeyboardInterrupt:  # no new point starts; the running ones stop and say so
            pool.shutdown(wait=False, cancel_futures=True)
            running.interrupt()
            bar.close()
            raise
        pool.shutdown()
    bar.close()
    table = pd.DataFrame(rows)
    settings = [n for n in names if n != "seed"]
    metrics = [
        c
        for c in table.columns
        if c not in (*names, "status", "reused", "run", "error") and pd.api.types.is_numeric_dtype(table[c])
    ]
    ok = table[table["status"] == "ok"]
    if settings and len(ok):
        summary = ok.groupby(settings, dropna=False)[metrics].agg(["mean", "std"])
        summary.columns = [f"{m} {s}" for m, s in summary.columns]
        summary.insert(0, "runs", ok.groupby(settings, dropna=False).size())
        summary = summary.reset_index()
    else:
        summary = pd.DataFrame(
            [
                {
                    "runs": len(ok),
                    **{f"{m} mean": ok[m].mean() for m in metrics},
                    **{f"{m} std": ok[m].std() for m in metrics},
                }
            ]
        )
    folder = out / "sweeps" / stem / time.strftime("%Y%m%d-%H%M%S")
    folder.mkdir(parents=True, exist_ok=True)
    table.to_csv(folder / "runs.csv", index=False)
    summary.to_csv(folder / "summary.csv", index=False)
    axes_text = ", ".join(f"{n} in {sorted({str(p[n]) for p in points})}" for n in names)
    body = markdown_table(
        {"columns": [str(c) for c in summary.columns], "rows": summary.values.tolist(), "floatfmt": ".4g"}
    )
    (folder / "summary.md").write_text(f"# Sweep of {stem}{' (smoke)' if smoke else ''}: {axes_text}\n\n{body}\n")
    _figure(ok, settings, names, headline_metrics(ok, metrics), folder / "summary.png")
    return table, summary, folder


def headline_metrics(ok, metrics: list[str], most: int = 4) -> list[str]:
    """The metrics to draw: the notebook's headline ones where they are known, else the first few."""
    for run in ok["run"]:
        path = Path(run) / "metrics.json"
        if path.exists():
            head = [k for k in json.loads(path.read_text()).get("headline", {}) if k in metrics]
            if head:
                return head[:most]
    return metrics[:most]


def _figure(ok, settings, names, metrics, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not metrics or not len(ok):
        return
    x = settings[0] if settings else (names[0] if names else None)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.0), squeeze=False)
    for ax, m in zip(axes[0], metrics):
        if x is None:
            ax.bar([0], [ok[m].mean()], yerr=[ok[m].std()])
        else:
            groups = ok.groupby(x)[m]
            labels = [str(v) for v in groups.mean().index]
            ax.errorbar(range(len(labels)), groups.mean(), yerr=groups.std().fillna(0), fmt="o-", capsize=3)
            ax.plot([labels.index(str(v)) for v in ok[x]], ok[m], "k.", ms=3, alpha=0.6)
            ax.set(xticks=range(len(labels)), xticklabels=labels, xlabel=x)
        ax.set_title(m, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m frlab sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("notebook", metavar="NOTEBOOK")
    ap.add_argument(
        "-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUES"), help="comma-separated values"
    )
    ap.add_argument("--smoke", action="store_true", help="start from the notebook's smoke parameters")
    ap.add_argument("--jobs", type=int, default=1, help="points run at once (each with cores / jobs threads)")
    ap.add_argument("--out", type=Path, default=None, help="root folder of the runs (default: runs/)")
    ap.add_argument("--scheduler", default=None, help="a Dask scheduler's address: run the points on its workers")
    args = ap.parse_args(argv)
    try:
        table, summary, folder = sweep(
            args.notebook, args.param, args.smoke, args.jobs, args.out, scheduler=args.scheduler
        )
    except (ParameterError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: the finished points are kept; the same command resumes the sweep", file=sys.stderr)
        return 130
    (folder / "command.txt").write_text("python -m frlab sweep " + " ".join(shlex.quote(a) for a in argv) + "\n")
    print((folder / "summary.md").read_text())
    reused = int(table["reused"].sum())
    failed = table[table["status"] != "ok"]
    print(f"{len(table)} points ({reused} reused, {len(failed)} failed) -> {folder}")
    for _, r in failed.iterrows():
        print(f"error: {r['run'] or stem_of(args.notebook)} failed: {r.get('error', '')}", file=sys.stderr)
    return 1 if len(failed) else 0


def stem_of(name: str) -> str:
    return Path(name).stem

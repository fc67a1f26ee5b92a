"""`python -m frlab run`: execute notebooks headlessly with papermill, one folder per run.

    python -m frlab run NOTEBOOK... [-p NAME VALUE]... [--smoke] [--out DIR]
    python -m frlab run --all [--smoke]
    python -m frlab params NOTEBOOK                 # its parameters: names, types, defaults, smoke values
    python -m frlab sweep NOTEBOOK -p NAME V1,V2... [--jobs N]   # a grid of runs, one table (frlab.sweep)
    python -m frlab report [--readme README.md]     # the results section, from the latest full runs

Parameters are checked against each notebook's typed `parameters` cell before any kernel starts.
Each run writes runs/<notebook>/<run-id>/ with the executed notebook, params.json (values, seed,
versions, git commit, wall time, status: ok, failed or interrupted), the kernel's stderr
(kernel.log; the runner prints its lines except known noise), and the metrics.json and figures/
the notebook itself writes. Ctrl-C stops the run with one line and exit code 130. A kernel that
does no work for 10 minutes while the runner waits on it is stopped, and its run fails with a
message that says so (`Watchdog`; FRLAB_KERNEL_IDLE_LIMIT=SECONDS sets the limit, 0 turns it off).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import paths
from .params import ParameterError, coerce, parameters_cell, parameters_cell_index, parse_parameters


def notebooks_dir() -> Path:
    return paths.home() / "notebooks"


def all_notebooks() -> list[Path]:
    return sorted(notebooks_dir().glob("[0-9][0-9]_*.ipynb"))


def resolve(name: str) -> Path:
    """A path, a file name in notebooks/, or a stem with or without its number: 00_quickstart, quickstart."""
    p = Path(name)
    if p.suffix == ".ipynb" and p.is_file():
        return p.resolve()
    stem = p.name.removesuffix(".ipynb")
    found = [nb for nb in all_notebooks() if stem in (nb.stem, nb.stem[3:])]
    if len(found) == 1:
        return found[0].resolve()
    known = ", ".join(nb.stem for nb in all_notebooks()) or "none"
    raise ParameterError(f"no notebook {name!r}; available: {known}")


def versions() -> dict[str, str]:
    import numpy
    import papermill
    import torch

    from . import __version__

    return {
        "frlab": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "papermill": papermill.__version__,
        "platform": platform.platform(),
        "cuda": torch.version.cuda or "none",
    }


RUNNER_FILES = ("runner.py", "sweep.py", "report.py", "__main__.py")  # they change how runs are made, not their numbers


def code_digest(notebook: Path) -> str:
    """A digest of what a run's results depend on besides its parameters: the notebook and every
    source file of the frlab package but those that run notebooks and report on them (a sweep
    reuses a run only if this is unchanged)."""
    import hashlib

    h = hashlib.sha256(Path(notebook).read_bytes())
    pkg = Path(__file__).resolve().parent
    for f in sorted(pkg.rglob("*")):
        if f.suffix in (".py", ".csv") and "__pycache__" not in f.parts and f.name not in RUNNER_FILES:
            h.update(str(f.relative_to(pkg)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def git_commit() -> str:
    try:
        root = str(paths.home())
        out = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain"], capture_output=True, text=True)
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "") if out.returncode == 0 else "unknown"
    except OSError:
        return "unknown"


@dataclass
class Plan:
    notebook: Path
    values: dict[str, Any]
    smoke: bool
    params_cell: int  # index of the parameters cell


@dataclass
class Result:
    notebook: str
    run_dir: Path
    ok: bool
    wall_s: float
    headline: dict[str, Any] = field(default_factory=dict)
    error: str = ""


def plan(notebook: Path, overrides: list[tuple[str, str]], smoke: bool) -> Plan:
    """Resolve a notebook's parameter values; raise ParameterError before any kernel starts."""
    nb = json.loads(notebook.read_text())
    params = parse_parameters(parameters_cell(nb))
    values = {name: p.default for name, p in params.items()}
    if smoke:
        values.update({name: p.smoke for name, p in params.items() if p.has_smoke})
    for name, text in overrides:
        try:
            values[name] = coerce(params, name, text)
        except ParameterError as e:
            raise ParameterError(f"{notebook.stem}: {e}") from None
    return Plan(notebook, values, smoke, parameters_cell_index(nb))


def new_run_dir(out: Path, stem: str, smoke: bool) -> Path:
    base = time.strftime("%Y%m%d-%H%M%S") + ("-smoke" if smoke else "")
    for i in range(1000):
        d = out / stem / (base if i == 0 else f"{base}-{i}")
        try:
            d.mkdir(parents=True)
            (d / "figures").mkdir()
            return d
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {out / stem}")


KERNEL_NOISE = ("Kernel is running over TCP without encryption",)  # what every kernel prints: not news


POLL_S = 1.0  # the longest a wait for a kernel's message goes without looking at its socket again


def _kernel_manager(log: Path, watchdog: Watchdog | None = None):
    """A kernel manager whose kernel writes its stderr to `log` (in the run folder), so that the
    runner can show what is news and drop what every kernel prints; it tells `watchdog` the
    kernel's process id. Its clients wait for a message in slices of POLL_S: papermill waits for
    a cell's reply without a timeout, and now and then the event loop misses the wake-up of a
    message that has arrived, which a wait without a timeout then never looks at again (a timed
    poll finds it)."""
    from queue import Empty

    from jupyter_client.channels import AsyncZMQSocketChannel
    from jupyter_client.manager import AsyncKernelManager

    class PolledChannel(AsyncZMQSocketChannel):
        async def get_msg(self, timeout: float | None = None):
            while timeout is None:
                try:
                    return await super().get_msg(POLL_S)
                except Empty:
                    continue
            return await super().get_msg(timeout)

    class LoggedKernel(AsyncKernelManager):
        async def _async_launch_kernel(self, kernel_cmd, **kw):
            with open(log, "ab") as f:  # the child keeps its own copy of the descriptor
                kw["stderr"] = f
                out = await super()._async_launch_kernel(kernel_cmd, **kw)
            if watchdog is not None:
                watchdog.pid = getattr(self.provisioner, "pid", None)
            return out

        def client(self, **kw):
            kc = super().client(**kw)
            kc.shell_channel_class = kc.iopub_channel_class = kc.control_channel_class = PolledChannel
            kc.stdin_channel_class = PolledChannel
            return kc

    return LoggedKernel


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system, in seconds) of process `pid` and of every descendant alive now,
    read from /proc; None where there is no /proc (not Linux) or no such process."""
    tick = os.sysconf("SC_CLK_TCK")
    stats = {}
    for d in Path("/proc").glob("[0-9]*"):
        try:
            fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # gone meanwhile, or unreadable
        stats[int(d.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)  # ppid, utime + stime
    if pid not in stats:
        return None
    children: dict[int, list[int]] = {}
    for child, (parent, _) in stats.items():
        children.setdefault(parent, []).append(child)
    total, todo = 0.0, [pid]
    while todo:
        p = todo.pop()
        total += stats[p][1]
        todo += children.get(p, [])
    return total


class Watchdog:
    """Stops a kernel that does no work for `limit` seconds while the runner waits on it.

    A notebook's cells compute (training, embedding, plotting): their kernel, or a process it
    started, is busy. A kernel that sits idle while papermill still waits for a cell's reply has
    finished, and the reply went astray between the two; the runner would wait forever (the
    clients' sliced polling, `POLL_S`, finds a reply whose wake-up was missed; this is for the
    rest). Every `limit / 10` seconds (at most 30) the watchdog reads the CPU time of the
    kernel's process tree; once it has grown by less than 1% of the time passed for `limit`
    seconds, it kills the kernel, papermill ends with a dead kernel, and the run fails with a
    message that says why. `FRLAB_KERNEL_IDLE_LIMIT` sets `limit` (default 600 s; 0 turns the
    watchdog off). Linux only (it reads /proc); elsewhere it does nothing."""

    def __init__(self, limit: float):
        import threading

        self.limit, self.pid, self.fired = limit, None, False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="frlab kernel watchdog")

    def __enter__(self) -> Watchdog:
        if self.limit > 0 and Path("/proc/self/stat").exists():
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        interval = min(30.0, self.limit / 10)
        last = idle_since = None
        while not self._stop.wait(interval):
            cpu = cpu_seconds(self.pid) if self.pid is not None else None
            now = time.monotonic()
            if cpu is None:
                continue  # not started yet, or ended
            if last is None or cpu - last >= 0.01 * interval:
                idle_since = now
            last = cpu
            if now - idle_since >= self.limit:
                self.fired = True
                os.kill(self.pid, signal.SIGKILL)  # papermill sees a dead kernel and returns
                return


def idle_limit() -> float:
    """`FRLAB_KERNEL_IDLE_LIMIT` in seconds (a number >= 0), else 600."""
    text = os.environ.get("FRLAB_KERNEL_IDLE_LIMIT", "600")
    try:
        limit = float(text)
    except ValueError:
        raise ParameterError(f"FRLAB_KERNEL_IDLE_LIMIT must be a number of seconds, got {text!r}") from None
    if not limit >= 0:
        raise ParameterError(f"FRLAB_KERNEL_IDLE_LIMIT must be >= 0 (0: no watchdog), got {text!r}")
    return limit


def kernel_news(log: Path) -> list[str]:
    """The lines of a kernel's stderr log that are not known noise."""
    if not log.exists():
        return []
    lines = log.read_text(errors="replace").splitlines()
    return [line for line in lines if line.strip() and not any(n in line for n in KERNEL_NOISE)]


def execute(p: Plan, out: Path) -> Result:
    import papermill as pm

    run_dir = new_run_dir(out, p.notebook.stem, p.smoke)
    values = {**p.values, "run_dir": str(run_dir)}
    meta = {
        "notebook": p.notebook.name,
        "smoke": p.smoke,
        "parameters": values,
        "seed": p.values.get("seed"),
        "versions": versions(),
        "git_commit": git_commit(),
        "code_digest": code_digest(p.notebook),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_json(run_dir / "params.json", meta)
    t0 = time.perf_counter()
    error = ""
    watchdog = Watchdog(idle_limit())
    try:
        with watchdog:
            pm.execute_notebook(
                str(p.notebook),
                str(run_dir / p.notebook.name),
                parameters=values,
                kernel_name="python3",
                cwd=str(p.notebook.parent),
                progress_bar=sys.stderr.isatty(),
                kernel_manager_class=_kernel_manager(run_dir / "kernel.log", watchdog),
            )
    except (KeyboardInterrupt, pm.PapermillExecutionError) as e:
        if isinstance(e, pm.PapermillExecutionError) and e.ename != "KeyboardInterrupt":
            error = _cell_error(e, p)
        else:  # Ctrl-C, seen by the runner or first by the kernel
            meta.update(wall_s=round(time.perf_counter() - t0, 2), status="interrupted", error="interrupted")
            write_json(run_dir / "params.json", meta)
            raise KeyboardInterrupt from None
    except Exception as e:  # kernel died, notebook unreadable, ...
        error = f"{type(e).__name__}: {e}"
    if watchdog.fired:
        error = (
            f"a lost reply: the kernel did no work for {watchdog.limit:g} s while the runner waited on a cell, "
            "so it was stopped; run the notebook again (FRLAB_KERNEL_IDLE_LIMIT sets the limit)"
        )
    wall = time.perf_counter() - t0
    meta.update(wall_s=round(wall, 2), status="failed" if error else "ok", error=error)
    write_json(run_dir / "params.json", meta)
    headline = {}
    if (run_dir / "metrics.json").exists():
        headline = json.loads((run_dir / "metrics.json").read_text()).get("headline", {})
    return Result(p.notebook.stem, run_dir, not error, wall, headline, error)


def _cell_error(e, p: Plan) -> str:
    """Which cell failed and how, in the numbering of the notebook the user edits: papermill
    inserts one `injected-parameters` cell after the parameters cell (cells count 1-based,
    markdown included)."""
    cell = e.cell_index if e.cell_index <= p.params_cell else e.cell_index - 1
    first = (e.source or "").strip().splitlines()[:1]
    return (
        f"cell {cell + 1} (In [{e.exec_count}] of the executed notebook"
        + (f", starting `{first[0][:60]}`" if first else "")
        + f") raised {e.ename}: {e.evalue}"
    )


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str) + "\n")
    tmp.replace(path)


def fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary(results: list[Result], root: Path) -> str:
    lines = [
        "| notebook | status | wall | headline metrics | run folder |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        metrics = ", ".join(f"{k} = {fmt(v)}" for k, v in r.headline.items()) or "-"
        rel = r.run_dir.relative_to(root) if r.run_dir.is_relative_to(root) else r.run_dir
        lines.append(f"| {r.notebook} | {'ok' if r.ok else 'FAILED'} | {r.wall_s:.0f} s | {metrics} | {rel} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        from . import sweep

        return sweep.main(argv[1:])
    if argv[:1] == ["train"]:
        from . import job

        return job.main(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m frlab", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="execute notebooks headlessly with papermill")
    r.add_argument(
        "notebooks", nargs="*", metavar="NOTEBOOK", help="path, file name or stem (00_quickstart, quickstart)"
    )
    r.add_argument("--all", action="store_true", help="every notebooks/NN_*.ipynb, in order")
    r.add_argument("-p", "--param", nargs=2, action="append", default=[], metavar=("NAME", "VALUE"))
    r.add_argument("--smoke", action="store_true", help="use each notebook's smoke parameters (seconds, for CI)")
    r.add_argument(
        "--out",
        type=Path,
        default=None,
        help="root folder of the runs (default: runs/ of the workbook, see frlab.paths)",
    )
    sub.add_parser("sweep", help="a grid of runs of one notebook and one table of them (see `sweep --help`)")
    sub.add_parser("train", help="one training job from a config, on one process or under torchrun (`train --help`)")
    pp = sub.add_parser("params", help="list a notebook's parameters: name, type, default, smoke value")
    pp.add_argument("notebook", metavar="NOTEBOOK", help="path, file name or stem (00_quickstart, quickstart)")
    rp = sub.add_parser("report", help="the results section, generated from the latest full run of each notebook")
    rp.add_argument("--runs", type=Path, default=None, help="root folder of the runs (default: runs/ of the workbook)")
    rp.add_argument("--readme", type=Path, default=None, help="also replace the results block of this README")
    rp.add_argument(
        "--keep",
        action="store_true",
        help="with --readme: a notebook without a full run here keeps its README section (it names its run and commit)",
    )
    args = ap.parse_args(argv)
    logging.getLogger("papermill").setLevel(logging.WARNING)
    if args.cmd == "report":
        return report_main(args)
    if args.cmd == "params":
        return params_main(args.notebook)

    try:
        names = [resolve(n) for n in args.notebooks]
        if args.all:
            names += [nb for nb in all_notebooks() if nb.resolve() not in names]
        if not names:
            raise ParameterError("no notebook given; name one or use --all")
        plans = [plan(nb, args.param, args.smoke) for nb in names]
        idle_limit()
    except (ParameterError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    out = (args.out or paths.runs()).resolve()
    os.environ.setdefault("FRLAB_HOME", str(paths.home()))  # the kernels write the model cache where this runner does
    results = []
    for i, p in enumerate(plans, 1):
        print(f"[{i}/{len(plans)}] {p.notebook.stem}{' (smoke)' if p.smoke else ''} ...", flush=True)
        try:
            res = execute(p, out)
        except KeyboardInterrupt:
            print(f"interrupted: {p.notebook.stem}; its run folder is marked so", file=sys.stderr)
            return 130
        for line in kernel_news(res.run_dir / "kernel.log"):
            print(f"  kernel: {line}", file=sys.stderr)
        results.append(res)
        status = "ok" if res.ok else f"FAILED: {res.error}"
        print(f"[{i}/{len(plans)}] {res.notebook}: {status} in {res.wall_s:.1f} s -> {res.run_dir}", flush=True)
    table = summary(results, out)
    if args.all:
        (out / "summary.md").write_text(f"# Latest runs{' (smoke)' if args.smoke else ''}\n\n" + table)
    print("\n" + table, end="")
    failed = [r for r in results if not r.ok]
    for r in failed:
        print(f"error: {r.notebook} failed in {r.error}; see {r.run_dir / (r.notebook + '.ipynb')}", file=sys.stderr)
    return 1 if failed else 0


def params_main(name: str) -> int:
    """Print a notebook's parameters as a table, without starting a kernel."""
    try:
        nb = resolve(name)
        params = parse_parameters(parameters_cell(json.loads(nb.read_text())))
    except (ParameterError, OSError, json.JSONDecodeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rows = [("name", "type", "default", "smoke", "range")] + [
        (p.name, p.type, repr(p.default), repr(p.smoke) if p.has_smoke else "", p.range)
        for p in params.values()
        if p.name != "run_dir"
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    print(f"{nb.stem}: python -m frlab run {nb.stem} -p NAME VALUE ... [--smoke]")
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def report_main(args) -> int:
    from . import report

    root = (args.runs or paths.runs()).resolve()
    keep = None
    if args.keep:
        if not args.readme:
            print("error: --keep keeps sections of the README given by --readme", file=sys.stderr)
            return 2
        keep = report.sections(args.readme.read_text()) if args.readme.exists() else {}
    body = report.build(root, all_notebooks(), keep)
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.md").write_text("# Results\n\n" + body)
    print(f"wrote {root / 'results.md'}")
    if args.readme:
        try:
            text = report.replace_block(args.readme.read_text(), body)
            bench = root / "bench" / "full.md"
            if bench.exists():
                text = report.replace_block(text, bench.read_text(), report.BENCH_BEGIN, report.BENCH_END)
            sweep = report.latest_sweep(root)
            if sweep and report.SWEEP_BEGIN in text:
                text = report.replace_block(text, sweep, report.SWEEP_BEGIN, report.SWEEP_END)
            args.readme.write_text(text)
        except (OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"replaced the results block of {args.readme}")
    return 0

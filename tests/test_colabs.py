"""The notebooks only import the library; running their code cells must work."""

import contextlib
import io
import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "colabs").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_run(notebook):
    cells = json.loads(notebook.read_text())["cells"]
    namespace, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        for cell in cells:
            if cell["cell_type"] == "code":
                exec("".join(cell["source"]), namespace)  # noqa: S102
    assert out.getvalue().strip(), "the notebook printed nothing"

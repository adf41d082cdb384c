"""The notebooks only import the library; running their code cells must work."""

import contextlib
import io
import json
import shutil
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "colabs").glob("*.ipynb"))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_code_cells_run(notebook, request, monkeypatch):
    if notebook.name == "router.ipynb":  # its small run: the config it builds is checked, the run is the session's
        from jaxdistill.router import run as route

        finished, results = request.getfixturevalue("route_run")

        def run(config):
            route.validate(config)
            shutil.copy(Path(finished.workdir, "results.json"), config.workdir)
            return results

        monkeypatch.setattr(route, "run", run)
    cells = json.loads(notebook.read_text())["cells"]
    namespace, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        for cell in cells:
            if cell["cell_type"] == "code":
                exec("".join(cell["source"]), namespace)  # noqa: S102
    assert out.getvalue().strip(), "the notebook printed nothing"

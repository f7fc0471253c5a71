"""The tutorial notebooks run top to bottom (their cells assert what they show) and are committed clean."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
TUTORIALS = ["01_quickstart.ipynb", "02_debug_a_mismatch.ipynb", "03_debug_with_the_widget.ipynb"]


def test_tutorials_exist():
    names = {p.name for p in NOTEBOOKS}
    assert set(TUTORIALS) <= names, names


@pytest.mark.parametrize("name", TUTORIALS)
@pytest.mark.timeout(600)
def test_notebook_executes(name, tmp_path, monkeypatch, unix_socket_kernel):
    # run a copy in a scratch directory: outputs are never written into the repository
    work = tmp_path / "notebooks"
    work.mkdir()
    copy = work / name
    shutil.copy(ROOT / "notebooks" / name, copy)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, km=unix_socket_kernel, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(work)}})
    client.execute()  # raises CellExecutionError on the first failing cell (asserts included)
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
              if o.get("output_type") == "error"]
    assert not errors, errors
    # every code cell ran
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for k, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name} cell {k} has outputs: strip them before committing"
        assert cell.get("execution_count") is None, f"{path.name} cell {k} has an execution count"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"

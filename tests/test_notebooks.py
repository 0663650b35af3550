"""Every notebook in notebooks/ runs top to bottom against the local backend, except those
that need a cloud (metadata cloudlab.needs): tests/cloud/test_cloud_notebook.py runs them."""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, wait_until_gone

ALL = sorted((ROOT / "notebooks").glob("*.ipynb"))
CLOUD = [ROOT / "notebooks" / "06-cloud.ipynb"]  # (run against moto_server, elsewhere)
NOTEBOOKS = [p for p in ALL if p not in CLOUD]


def test_only_the_cloud_notebooks_need_a_cloud():
    assert [p for p in ALL if "needs" in nbformat.read(p, as_version=4).metadata.get(
        "cloudlab", {})] == CLOUD


def test_there_is_a_start_here_notebook():
    assert (ROOT / "notebooks" / "00-start-here.ipynb") in NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    nbformat.write(nb, tmp_path / path.name)  # the executed copy, for inspection
    assert wait_until_gone(timeout=10) == []  # the kernel stopped its clusters on exit

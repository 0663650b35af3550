"""The tutorial path, 00 to 05, as an attendee follows it: in a real JupyterLab in a real
browser (Debian's chromium), each notebook opened, run with Run > Run All Cells, read, then
closed with File > Close and Shut Down Notebook. (06 needs a cloud: tests/cloud runs it the
same way against moto_server.)

What is asserted is what the attendee sees: every code cell ran with no traceback, every
plot is drawn, every widget rendered, the exercises are there and their solutions are
hidden (folded ``<details>``, or code cells whose input is collapsed), and once the
notebook is shut down none of its engines is left.
"""

from __future__ import annotations

import shutil

import nbformat
import pytest

from conftest import ROOT, wait_until_gone
from jupyterlab_support import (
    check_what_an_attendee_sees,
    chromium_page,
    lab_for_a_test,
    run_in_lab,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

PATH = sorted(p.name for p in (ROOT / "notebooks").glob("0[0-5]-*.ipynb"))


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab on a copy of the path's notebooks."""
    with lab_for_a_test(tmp_path_factory.mktemp("tutorial")) as server:
        for name in PATH:
            shutil.copy(ROOT / "notebooks" / name, server.root / name)
        yield server


@pytest.fixture(scope="module")
def page(lab, tmp_path_factory):
    """One browser for the whole path, as an attendee keeps one tab open."""
    with chromium_page(tmp_path_factory.mktemp("chromium")) as page:
        yield page


def test_the_path_is_00_to_05_then_the_cloud():
    assert sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb")) == [
        *PATH, "06-cloud.ipynb"]
    assert PATH == ["00-start-here.ipynb", "01-monte-carlo-pi.ipynb", "02-gpu.ipynb",
                    "03-pct.ipynb", "04-classifier.ipynb", "05-mpi-ring.ipynb"]


@pytest.mark.parametrize("name", PATH)
def test_notebook_runs_in_jupyterlab(lab, page, name, tmp_path):
    seen = run_in_lab(lab, page, name, tmp_path / f"{name}.png")
    check_what_an_attendee_sees(name, nbformat.read(lab.root / name, as_version=4), seen)
    assert wait_until_gone(timeout=15, servers=False) == []

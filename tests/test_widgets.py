"""Cluster views: pure renderers, the live widget's refresh, and the fallbacks."""

import time

from nbclient import NotebookClient
from nbformat.v4 import new_code_cell, new_notebook

from cloudlab.cluster import EngineStatus
from cloudlab.widgets import status

ROWS = (EngineStatus(0, "vm", 101, "idle", 0.0, 64.5, 10),
        EngineStatus(1, "vm", 102, "busy", 99.0, 70.0, 7))
SNAP = status.Snapshot("ipp-abc", "ipyparallel", "local", "running", 75.0, ROWS,
                       counts={"idle": 1, "busy": 1, "starting": 0, "dead": 0})


def test_text_rendering_is_a_readable_table():
    text = status.render_text(SNAP)
    lines = text.splitlines()
    assert lines[0] == ("ipp-abc: ipyparallel on local, running, 2 engines (1 idle, 1 busy), "
                        "17 tasks done, up 1 min")
    assert lines[1].split() == ["id", "host", "pid", "state", "CPU", "%", "memory", "MB",
                                "tasks", "done"]
    assert lines[3].split() == ["1", "vm", "102", "busy", "100", "70", "7"]


def test_html_rendering_has_one_row_per_engine_and_a_cost_slot():
    page = status.render_html(SNAP)
    assert page.count("class='cl-engine'") == 2
    assert "data-cluster='ipp-abc'" in page and "VBox" not in page
    costly = status.Snapshot("c", "dask", "ec2", "running", 3600, ROWS, 0.42, 0.42)
    assert "$0.42/h, $0.42 so far" in status.summary_line(costly)


def test_widget_refreshes_while_work_runs_at_most_once_a_second(cluster):
    view = status.ClusterWidget(cluster)
    try:
        start = view.updates
        future = cluster.submit(time.sleep, 3)
        time.sleep(2.5)
        assert "busy" in view.table.value  # refreshed while the main thread waited
        future.result(timeout=10)
        time.sleep(1.5)
        assert "busy" not in view.table.value
        assert view.updates - start <= 6  # about 4 s of refreshes, one a second at most
    finally:
        view.close()


def test_widget_sends_nothing_when_nothing_changed(cluster, monkeypatch):
    view = status.ClusterWidget(cluster)
    view.close()
    monkeypatch.setattr(status, "snapshot", lambda c: SNAP)
    view.refresh()
    sent = view.updates
    for _ in range(5):
        view.refresh()
    assert view.updates == sent


def test_scale_and_stop_buttons_act_on_the_cluster(engine):
    import cloudlab

    with cloudlab.Cluster(1, engine=engine) as c:
        view = status.ClusterWidget(c)
        view.size.value = 2
        view.scale_button.click()
        assert c.engine_ids == [0, 1]
        assert view.table.value.count("class='cl-engine'") == 2
        view.stop_button.click()
        assert c.state == "stopped"
        assert view.stop_button.disabled and "Stopped" in view.message.value
        assert view.table.value.count("class='cl-engine'") == 0


def test_executed_notebook_keeps_a_text_table_not_a_vbox(tmp_path):
    nb = new_notebook(cells=[new_code_cell("%load_ext cloudlab"),
                             new_code_cell("%cluster start 2"),
                             new_code_cell("cluster.map(abs, range(-5, 5)); cluster"),
                             new_code_cell("%cluster stop")])
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    shown = [o for cell in nb.cells for o in cell.outputs
             if o.output_type in ("display_data", "execute_result")]
    progress = [o for o in shown if o.data["text/plain"].startswith("map abs")]
    shown = [o for o in shown if o not in progress]
    assert len(shown) == 2  # the widget at start, and the displayed cluster
    # The map's progress bar was saved in its final state, as text.
    [bar] = progress
    assert bar.data["text/plain"].startswith("map abs: 10/10 (100%) done in ")
    assert "IntProgress" not in str(bar.data)
    for output in shown:
        assert "application/vnd.jupyter.widget-view+json" in output.data
        assert "VBox(" not in output.data["text/plain"]
        assert "2 engines" in output.data["text/plain"]
    assert "10 tasks done" in shown[1].data["text/plain"]
    assert "<table class='cl-engines'>" in shown[1].data["text/html"]


def test_nbconvert_execution_keeps_text_fallbacks_and_html_has_no_vbox(tmp_path):
    import subprocess
    import sys

    import nbformat

    nb = new_notebook(cells=[new_code_cell("%load_ext cloudlab"),
                             new_code_cell("%cluster start 2 --engine dask"),
                             new_code_cell("cluster.map(abs, range(4)); cluster"),
                             new_code_cell("%cluster stop")],
                      metadata={"kernelspec": {"name": "python3", "display_name": "Python 3",
                                               "language": "python"}})
    source = tmp_path / "headless.ipynb"
    nbformat.write(nb, source)

    def nbconvert(*args):
        result = subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", *args],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert result.returncode == 0, result.stderr

    nbconvert("--to", "notebook", "--execute", "--output", "executed.ipynb", str(source))
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    texts = [o.data["text/plain"] for cell in executed.cells for o in cell.outputs
             if o.output_type in ("display_data", "execute_result")]
    assert not any("VBox(" in t or "IntProgress(" in t or "HBox(" in t for t in texts), texts
    assert any(t.startswith("map abs: 4/4 (100%) done") for t in texts), texts
    assert any("2 engines" in t and "tasks done" in t for t in texts), texts
    nbconvert("--to", "html", "executed.ipynb")
    page = (tmp_path / "executed.html").read_text()
    assert "VBox(" not in page and "IntProgress(" not in page
    assert "cl-engines" in page

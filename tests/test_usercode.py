"""The user's own modules on the engines (cloudlab.usercode): found, packed, sent at start,
sent again when edited or when another is imported, on local engines as on remote ones
(tests/remote/test_ssh_backend.py), and by hand with c.sync() and %cluster sync."""

import importlib
import re
import sys

import pytest

import cloudlab
from cloudlab import usercode


@pytest.fixture
def user_folder(tmp_path, monkeypatch):
    """A folder on the import path, as the notebook's is: modules written there are the
    user's own."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written = []

    def write(name: str, text: str):
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(name.split("/")[0].removesuffix(".py"))
        return path

    yield write
    for name in written:
        for module in [m for m in sys.modules if m.split(".")[0] == name]:
            del sys.modules[module]


def test_the_watcher_packs_the_users_modules_and_no_installed_ones(user_folder):
    user_folder("uc_single.py", "X = 1\n")
    user_folder("uc_pkg/__init__.py", "from .inner import Y\n")
    user_folder("uc_pkg/inner.py", "Y = 2\n")
    user_folder("uc_pkg/__pycache__/junk.pyc", "")
    user_folder("uc_pkg/table.csv", "a,b\n")  # data: pushed by the user, not synced
    importlib.import_module("uc_single")
    importlib.import_module("uc_pkg")
    bundle = usercode.Watcher().current()
    assert {"uc_single", "uc_pkg"} <= set(bundle.modules)
    assert not {"numpy", "pytest", "cloudlab", "os"} & set(bundle.modules)
    import io
    import zipfile

    names = zipfile.ZipFile(io.BytesIO(bundle.archive)).namelist()
    assert {"uc_single.py", "uc_pkg/__init__.py", "uc_pkg/inner.py"} <= set(names)
    assert not any("__pycache__" in n or n.endswith(".csv") for n in names)
    assert re.search(rf"\({bundle.files} files, [\d.]+ (bytes|KB|MB)\)$", bundle.describe())


def test_an_edit_or_a_new_import_makes_a_new_archive_and_nothing_else_does(user_folder):
    path = user_folder("uc_edit.py", "X = 1\n")
    importlib.import_module("uc_edit")
    watcher = usercode.Watcher()
    first = watcher.current()
    assert watcher.current() is first  # nothing changed: the same archive, not repacked
    path.write_text("X = 22\n")
    second = watcher.current()
    assert second.digest != first.digest
    user_folder("uc_later.py", "Z = 3\n")
    importlib.import_module("uc_later")
    assert "uc_later" in watcher.current().modules
    # One module dropped and another imported: the count of modules is as it was.
    del sys.modules["uc_later"]
    user_folder("uc_instead.py", "W = 4\n")
    importlib.import_module("uc_instead")
    assert {"uc_instead"} <= set(watcher.current().modules) and \
        "uc_later" not in watcher.current().modules


@pytest.mark.parametrize("engine", ["ipyparallel", "dask"])
def test_local_engines_see_an_edited_module_without_a_restart(user_folder, engine):
    path = user_folder(f"uc_tools_{engine}.py", "def triple(x):\n    return 3 * x\n")
    tools = importlib.import_module(f"uc_tools_{engine}")
    with cloudlab.Cluster(2, engine=engine) as c:
        assert c.map(tools.triple, range(4)) == [0, 3, 6, 9]
        path.write_text("def triple(x):\n    return 30 * x\n")
        assert c.map(tools.triple, range(4)) == [0, 30, 60, 90]  # sent before the map
        path.write_text("def triple(x):\n    return 300 * x\n")
        assert c.submit(tools.triple, 1).result(timeout=30) == 300
        # An engine that joins later gets the modules as they are now.
        c.scale(3)
        assert c.run(tools.triple, 1) == {0: 300, 1: 300, 2: 300}
        # A name bound to the module on the engines follows the edit too.
        c.execute(f"import uc_tools_{engine} as bound")
        path.write_text("def triple(x):\n    return 3000 * x\n")
        synced = c.sync()
        assert f"uc_tools_{engine}" in synced.modules and c.code is synced
        from cloudlab.widgets.status import snapshot, summary_line

        assert summary_line(snapshot(c)).endswith(f"; your code synced: {synced.describe()}")
        c.execute("value = bound.triple(1)")
        assert set(c.pull("value").values()) == {3000}


def test_cluster_sync_says_what_the_engines_have(ip, capsys, user_folder):
    user_folder("uc_magic.py", "A = 1\n")
    importlib.import_module("uc_magic")
    ip.run_line_magic("cluster", "start 2")
    try:
        capsys.readouterr()
        ip.run_line_magic("cluster", "sync")
        out = capsys.readouterr().out
        assert out.startswith(f"{ip.user_ns['cluster'].name}: its 2 engines have ")
        assert "uc_magic" in ip.user_ns["cluster"].code.modules
    finally:
        ip.run_line_magic("cluster", "stop")

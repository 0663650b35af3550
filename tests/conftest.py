"""Shared fixtures: isolated CLOUDLAB_HOME, process accounting, one cluster per engine kind.

Every process a test run starts inherits CLOUDLAB_TEST_RUN, so the suite can
find (and count) exactly its own engines, controllers and schedulers.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

pytest_plugins = ("external",)  # corpus, Redis and moto_server fixtures

RUN_ID = uuid.uuid4().hex[:12]
os.environ["CLOUDLAB_TEST_RUN"] = RUN_ID
os.environ["CLOUDLAB_HOME"] = tempfile.mkdtemp(prefix="cloudlab-test-home-")
atexit.register(shutil.rmtree, os.environ["CLOUDLAB_HOME"], ignore_errors=True)
ENGINES = ["ipyparallel", "dask"]
ROOT = Path(__file__).resolve().parent.parent


def our_processes(cluster: str | None = None, servers: bool = True) -> list[psutil.Process]:
    """Live cloudlab processes started by this test run: those of clusters (of ``cluster``
    only, if given) and, with ``servers``, fork servers of other processes than this one
    (this process's own live as long as it does, by design).

    Processes carry a title (``cloudlab: NAME engine-3``, ``cloudlab fork server
    (dask) of pid P``); CLOUDLAB_TEST_RUN in their environment tells this run's.
    """
    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        words = " ".join(proc.info["cmdline"] or []).split()
        if words[:1] == ["cloudlab:"]:
            if cluster is not None and words[1:2] != [cluster]:
                continue
        elif words[:3] == ["cloudlab", "fork", "server"]:
            if cluster is not None or not servers or words[-1] == str(os.getpid()):
                continue
        else:
            continue
        try:
            ours = proc.environ().get("CLOUDLAB_TEST_RUN") == RUN_ID
        except psutil.Error:
            continue
        if ours and proc.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(proc)
    return found


def launched(cluster: str) -> list[psutil.Process]:
    """The processes a backend launched for ``cluster`` (each leads its own group);
    their children (ipyparallel's heart monitor, say) are left out."""
    leaders = []
    for proc in our_processes(cluster):
        try:
            if os.getpgid(proc.pid) == proc.pid:
                leaders.append(proc)
        except ProcessLookupError:
            pass
    return leaders


def wait_until_gone(cluster: str | None = None, timeout: float = 10.0,
                    servers: bool = True) -> list[psutil.Process]:
    """Poll the process table until no process of ``cluster`` is left; return survivors."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = our_processes(cluster, servers)
        if not left:
            return []
        time.sleep(0.1)
    return our_processes(cluster, servers)


@pytest.fixture(params=ENGINES)
def engine(request) -> str:
    return request.param


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request):
    """A running 3-engine cluster per engine kind, shared by a module's tests."""
    import cloudlab

    with cloudlab.Cluster(3, engine=request.param) as c:
        yield c
    assert wait_until_gone(c.name, 5) == []


@pytest.fixture(scope="module")
def ip():
    """An IPython shell with cloudlab's magics, as a notebook user has it."""
    from IPython.core.interactiveshell import InteractiveShell

    import cloudlab

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "cloudlab")
    yield shell
    for c in cloudlab.running_clusters():
        c.stop()


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture(scope="session", autouse=True)
def nothing_left_behind():
    yield
    from cloudlab.backends import forking

    forking.close_all()  # they live as long as the test process, by design
    survivors = wait_until_gone(timeout=10) + [
        p for p in psutil.Process().children() if p.name().startswith("cloudlab fork server")]
    assert survivors == [], f"processes outlived the test run: {[p.cmdline() for p in survivors]}"


_recoveries: list[dict] = []


@pytest.fixture
def reliability():
    """``reliability(fault, engine, outcome, seconds)`` records one measured recovery; the
    session writes them to ``test-artifacts/reliability.json`` (docs/reliability.md quotes
    them) and prints them."""

    def record(fault: str, engine: str, outcome: str, seconds: float) -> None:
        _recoveries.append({"fault": fault, "engine": engine, "outcome": outcome,
                            "seconds": round(seconds, 3)})

    return record


def pytest_addoption(parser):
    parser.addoption("--run-cloud", action="store_true",
                     help="also run the tests marked live_cloud, against a real cloud account "
                          "(they create VMs, which costs money; profiles from "
                          "CLOUDLAB_LIVE_PROFILES, default aws-cpu)")


def pytest_collection_modifyitems(config, items):
    """Tests against a real cloud account run only when asked for (--run-cloud): they are
    deselected otherwise, not skipped (a skip fails CI, which has no account)."""
    if config.getoption("--run-cloud"):
        return
    live = [item for item in items if item.get_closest_marker("live_cloud")]
    if live:
        config.hook.pytest_deselected(items=live)
        items[:] = [item for item in items if item not in live]


def pytest_terminal_summary(terminalreporter):
    if not _recoveries:
        return
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / "reliability.json").write_text(json.dumps(_recoveries, indent=1))
    width = max(len(r["fault"]) for r in _recoveries)
    terminalreporter.write_sep("-", "reliability: seconds to recover")
    for r in _recoveries:
        terminalreporter.write_line(
            f"{r['fault']:<{width}}  {r['engine']:<11}  {r['seconds']:>7.3f}  {r['outcome']}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With CLOUDLAB_NO_SKIP=1 (CI), a skip is a failure: CI must exercise everything it
    can. GPU tests are the exception: no CI machine has a GPU (they run on a lent one)."""
    outcome = yield
    report = outcome.get_result()
    if (os.environ.get("CLOUDLAB_NO_SKIP") == "1" and report.skipped
            and not hasattr(report, "wasxfail") and item.get_closest_marker("gpu") is None):
        report.outcome = "failed"
        report.longrepr = f"skipped, but CLOUDLAB_NO_SKIP=1 forbids skips: {report.longrepr}"

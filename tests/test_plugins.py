"""A backend and a workload from a package outside cloudlab (tests/plugins/toy_backend),
installed beside it, get `cloudlab start`, `list`, `doctor`, `gc` and `run` with no change
in cloudlab: the commands find them by entry point, as they find cloudlab's own."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import ROOT, wait_until_gone

PACKAGE = ROOT / "tests" / "plugins" / "toy_backend"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The toy package installed into a folder of its own, and a profile that uses it."""
    root = tmp_path_factory.mktemp("toy")
    source, site = root / "source", root / "site"
    shutil.copytree(PACKAGE, source)  # (pip builds in the tree it is given)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                    str(site), str(source)],
                   check=True, capture_output=True, timeout=120)
    resources = root / "resources"
    resources.mkdir()
    home = root / "home"
    (home / "profiles").mkdir(parents=True)
    (home / "profiles" / "toy.toml").write_text(
        f'description = "the toy backend"\nbackend = "toy"\nengine = "inprocess"\n'
        f'engines = 2\n\n[toy]\nresource_dir = "{resources}"\n')
    env = {**os.environ, "PYTHONPATH": str(site), "CLOUDLAB_HOME": str(home)}
    return env, resources


def cloudlab(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudlab.cli", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_doctor_asks_the_backend_and_a_backend_without_checks_says_so(toy):
    env, resources = toy
    done = cloudlab(env, "doctor", "--profile", "toy")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[0] == f"ok   resource folder: {resources} for 2 engines"
    assert "1 of 1 checks passed" in done.stdout
    local = cloudlab(env, "doctor", "--profile", "local")
    assert local.returncode == 2
    assert local.stderr.startswith("cloudlab doctor: profile local uses the local backend, "
                                   "which has nothing to check before a start")


def test_start_list_stop_and_gc_of_what_a_stopped_cluster_left(toy):
    env, resources = toy
    start = subprocess.Popen([sys.executable, "-m", "cloudlab.cli", "start", "--profile",
                              "toy", "--name", "toy-run"], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert "toy-run: 2 inprocess engines on toy, ready in" in start.stdout.readline()
        listed = cloudlab(env, "list").stdout
        assert listed.split()[:4] == ["toy-run", "inprocess", "toy", "2"]
        # The running cluster's file is not garbage; a file of a cluster gone is.
        (resources / "toy-gone-1").write_text("2")
        # Every profile's place: the toy folder, and the clouds of the repository's profiles,
        # which without credentials cannot be cleaned (said in a line each).
        said = cloudlab(env, "gc", "--dry-run")
        assert f"would delete in toy folder {resources}: toy-gone-1" in said.stdout
        assert "toy-run" not in said.stdout
        assert said.stdout.splitlines()[-1].startswith("1 resources to delete in ")
        assert said.returncode == (2 if said.stderr else 0)
        assert all(line.startswith("cloudlab gc: cannot clean ")
                   for line in said.stderr.splitlines())
    finally:
        start.send_signal(signal.SIGINT)
        assert start.wait(30) == 0
    assert "Stopped toy-run." in start.stdout.read()
    assert cloudlab(env, "list").stdout.strip() == "No clusters are running."
    done = cloudlab(env, "gc", "--profile", "toy")
    assert done.returncode == 0, done.stderr
    assert sorted(done.stdout.splitlines()[:-1]) == [
        f"deleted in toy folder {resources}: toy-gone-1",
        f"deleted in toy folder {resources}: toy-toy-run"]
    assert list(resources.iterdir()) == []
    assert wait_until_gone("toy-run", 5) == []


def test_the_packages_workload_runs_from_the_command(toy):
    env, _ = toy
    t0 = time.monotonic()
    done = cloudlab(env, "run", "squares", "--count", "10", "--profile", "toy", "--json")
    assert done.returncode == 0, done.stderr
    assert '"sum": 285' in done.stdout and '"backend": "toy"' in done.stdout
    assert time.monotonic() - t0 < 60

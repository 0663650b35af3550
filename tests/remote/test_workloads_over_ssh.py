"""The workloads, unchanged, on hosts that share nothing with the client: `cloudlab run`
with a profile naming the test hosts, as a user runs it. Models, corpora and phantoms
reach the engines as values (pushed), never as paths of the client's."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hosts import SSH_PORT

CLOUDLAB = [sys.executable, "-m", "cloudlab.cli"]


def _write_profile(name: str, test_hosts, more: str = "") -> Path:
    """A profile of the test hosts in the test run's CLOUDLAB_HOME, as a user writes one."""
    hosts = ", ".join(f'"root@{h.address}:{SSH_PORT}"' for h in test_hosts.hosts)
    path = Path(os.environ["CLOUDLAB_HOME"]) / "profiles" / f"{name}.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'backend = "ssh"\nstart_timeout = 300\n\n[ssh]\nhosts = [{hosts}]\n'
                    f'identity_file = "{test_hosts.user_key}"\n'
                    f'known_hosts = "{test_hosts.known_hosts}"\n{more}')
    return path


@pytest.fixture(scope="module")
def ssh_profile(test_hosts):
    path = _write_profile("lab", test_hosts)
    yield "lab"
    path.unlink()


@pytest.fixture(scope="module")
def controller_on_a_host(test_hosts):
    """The same hosts, with the controller on the first of them (the client's files are
    not there either)."""
    first = test_hosts.hosts[0]
    path = _write_profile("lab-controller", test_hosts,
                          f'controller_host = "root@{first.address}:{SSH_PORT}"\n')
    yield "lab-controller"
    path.unlink()


def _run(*args: str) -> dict:
    done = subprocess.run([*CLOUDLAB, "run", *args, "--json"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_workloads_with_the_controller_on_a_host(controller_on_a_host, test_hosts):
    figures = _run("classify", "--engines", "2", "--limit", "2000", "--profile",
                   controller_on_a_host)
    assert figures["documents"] == figures["rows"] == 2000 and figures["accuracy"] > 0.7
    figures = _run("pi", "--engines", "2", "--samples", "1e8", "--profile", controller_on_a_host)
    assert abs(figures["estimate"] - math.pi) < 5 * figures["stderr"]
    figures = _run("pct", "--size", "small", "--engines", "2", "--profile", controller_on_a_host)
    assert figures["max_insert_error_pct"] <= 1.0 and figures["rmse"] <= 0.040
    # The queue form: the hosts may not reach this machine, so its Redis reaches them
    # through SSH forwards, on each host's own loopback.
    figures = _run("classify", "--engines", "2", "--limit", "2000", "--mode", "queue",
                   "--profile", controller_on_a_host)
    assert figures["documents"] == figures["rows"] == 2000 and figures["workers"] == 2
    assert test_hosts.cloudlab_processes() == {h.name: [] for h in test_hosts.hosts}


@pytest.mark.parametrize("engine", ["ipyparallel", "dask"])
def test_pi_on_the_hosts(ssh_profile, engine):
    figures = _run("pi", "--engines", "2", "--samples", "2e8", "--engine", engine,
                   "--profile", ssh_profile)
    assert figures["backend"] == "ssh" and figures["engines"] == 2
    assert abs(figures["estimate"] - math.pi) < 5 * figures["stderr"]


@pytest.mark.parametrize("mode", ["cluster", "queue"])
def test_classify_gives_one_row_per_document_on_the_hosts(ssh_profile, mode):
    # The queue form's Redis listens where the hosts reach this machine, with a password.
    figures = _run("classify", "--engines", "2", "--limit", "4000", "--mode", mode,
                   "--profile", ssh_profile)
    assert figures["backend"] == "ssh" and figures["workers"] == 2
    assert figures["documents"] == figures["rows"] == 4000
    assert figures["accuracy"] > 0.75


def test_a_proton_ct_reconstruction_on_the_hosts(ssh_profile):
    figures = _run("pct", "--size", "small", "--engines", "2", "--engine", "dask",
                   "--profile", ssh_profile)
    assert figures["backend"] == "ssh" and figures["engines"] == 2
    # The small CTP404 case, scored as on this machine (tests/pct/test_parallel.py).
    assert figures["max_insert_error_pct"] <= 1.0
    assert figures["rmse"] <= 0.040 and figures["rmse"] < figures["rmse_fbp"]

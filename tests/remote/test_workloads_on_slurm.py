"""The workloads, unchanged, as Slurm jobs on nodes that share nothing with the client:
`cloudlab run` with a Slurm profile, as a user runs it. The queue form's Redis listens
where the nodes reach this machine (the controller's address), with a password."""

import json
import math
import subprocess
import sys

import pytest

CLOUDLAB = [sys.executable, "-m", "cloudlab.cli"]


@pytest.fixture
def slurm_profile(test_slurm, write_profile, tmp_path):
    return write_profile("slurm-lab", {
        "backend": "slurm", "client_address": test_slurm.network.client_address,
        "log_dir": str(tmp_path / "slurm-logs"), "env_dir": str(test_slurm.env_dir)},
        start_timeout=300)


def _run(*args: str) -> dict:
    done = subprocess.run([*CLOUDLAB, "run", *args, "--json"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_pi_on_slurm(slurm_profile):
    figures = _run("pi", "--engines", "2", "--samples", "1e8", "--profile", slurm_profile)
    assert figures["backend"] == "slurm" and figures["engines"] == 2
    assert abs(figures["estimate"] - math.pi) < 5 * figures["stderr"]


@pytest.mark.parametrize("mode", ["cluster", "queue"])
def test_classify_gives_one_row_per_document_on_slurm(slurm_profile, mode):
    figures = _run("classify", "--engines", "2", "--limit", "3000", "--mode", mode,
                   "--profile", slurm_profile)
    assert figures["backend"] == "slurm" and figures["workers"] == 2
    assert figures["documents"] == figures["rows"] == 3000 and figures["accuracy"] > 0.75


def test_a_proton_ct_reconstruction_on_slurm(slurm_profile):
    figures = _run("pct", "--size", "small", "--engines", "2", "--engine", "dask",
                   "--profile", slurm_profile)
    assert figures["backend"] == "slurm" and figures["engines"] == 2
    assert figures["max_insert_error_pct"] <= 1.0
    assert figures["rmse"] <= 0.040 and figures["rmse"] < figures["rmse_fbp"]

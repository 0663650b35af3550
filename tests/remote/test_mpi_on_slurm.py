"""MPI on Slurm: `--mpi` on the slurm backend starts the engines as the ranks of one job
spread over its nodes in blocks (Open MPI starts them through Slurm; TCP between the
namespace nodes), and `cloudlab run ring` measures the hop between nodes."""

import json
import os
import subprocess
import sys

import pytest

import cloudlab
from conftest import wait_until_gone


def _mpi_args(test_slurm) -> list[str]:
    # The nodes share a hostname and /dev/shm (TESTING.md): TCP only, on the test network.
    subnet = f"{test_slurm.network.subnet}.0/24"
    return ["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", subnet,
            "--mca", "oob_tcp_if_include", subnet]


def _options(test_slurm, tmp_path) -> dict:
    return {"backend": "slurm", "client_address": test_slurm.network.client_address,
            "log_dir": str(tmp_path / "slurm-logs"), "env_dir": str(test_slurm.env_dir),
            "mpi_args": _mpi_args(test_slurm)}


def test_the_ranks_are_one_job_across_the_nodes_and_stop_with_the_cluster(test_slurm,
                                                                          tmp_path):
    with cloudlab.Cluster(4, mpi=True, **_options(test_slurm, tmp_path)) as c:
        def where():
            from mpi4py import MPI

            return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), \
                os.readlink("/proc/self/ns/net"), os.environ.get("SLURM_JOB_ID")

        seen = c.run(where)
        assert [seen[e][:2] for e in sorted(seen)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
        networks = [seen[e][2] for e in sorted(seen)]
        assert networks[0] == networks[1] != networks[2] == networks[3], networks  # blocks
        assert len({seen[e][3] for e in seen}) == 1  # one job
        with pytest.raises(cloudlab.ConfigError, match="one MPI job of 4 ranks"):
            c.scale(5)
    assert wait_until_gone(c.name, 10) == []
    queued = subprocess.run(["squeue", "-h", "--name", f"cloudlab-{c.name}"],
                            capture_output=True, text=True)
    assert queued.stdout.strip() == ""


def test_cloudlab_run_ring_measures_the_hop_between_nodes(test_slurm, write_profile,
                                                         tmp_path):
    profile = write_profile("slurm-mpi", _options(test_slurm, tmp_path), start_timeout=300)
    done = subprocess.run([sys.executable, "-m", "cloudlab.cli", "run", "ring", "--ranks", "2",
                           "--profile", profile, "--json"], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["backend"] == "slurm" and figures["ranks"] == 2 and figures["went_around"]
    assert all(us > 0 for us in figures["latency_us"])

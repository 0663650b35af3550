"""MPI across SSH hosts: `--mpi` on the ssh backend starts the engines as the ranks of one
Open MPI job spanning the test hosts (mpirun here, over the cluster's ssh; TCP between the
hosts), and `cloudlab run ring` measures the hop between them."""

import json
import os
import subprocess
import sys

import pytest

import cloudlab
from conftest import wait_until_gone
from hosts import SSH_PORT


def _mpi_args(test_hosts) -> list[str]:
    # The hosts share a hostname and /dev/shm (TESTING.md): TCP only, on the test network.
    subnet = f"{test_hosts.subnet}.0/24"
    return ["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", subnet,
            "--mca", "oob_tcp_if_include", subnet]


def test_the_ranks_span_the_hosts_in_turn_and_stop_with_the_cluster(test_hosts):
    with cloudlab.Cluster(4, backend="ssh", mpi=True, mpi_args=_mpi_args(test_hosts),
                          hosts=[f"root@{h.address}:{SSH_PORT}" for h in test_hosts.hosts],
                          identity_file=str(test_hosts.user_key),
                          known_hosts=str(test_hosts.known_hosts)) as c:
        def where():
            from mpi4py import MPI

            return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), \
                os.readlink("/proc/self/ns/net")

        seen = c.run(where)
        assert [seen[e][:2] for e in sorted(seen)] == [(0, 4), (1, 4), (2, 4), (3, 4)]
        networks = [seen[e][2] for e in sorted(seen)]
        assert networks[0] == networks[2] != networks[1] == networks[3]
        assert os.readlink(f"/proc/{os.getpid()}/ns/net") not in networks
        with pytest.raises(cloudlab.ConfigError, match="one MPI job of 4 ranks"):
            c.scale(5)
    assert wait_until_gone(c.name, 10) == []
    assert test_hosts.cloudlab_processes() == {h.name: [] for h in test_hosts.hosts}


def test_cloudlab_run_ring_measures_the_hop_between_hosts(test_hosts, tmp_path):
    hosts = ", ".join(f'"root@{h.address}:{SSH_PORT}"' for h in test_hosts.hosts)
    profile = tmp_path / "profiles" / "lab-mpi.toml"
    profile.parent.mkdir()
    profile.write_text(f'backend = "ssh"\nstart_timeout = 300\n\n[ssh]\nhosts = [{hosts}]\n'
                       f'identity_file = "{test_hosts.user_key}"\n'
                       f'known_hosts = "{test_hosts.known_hosts}"\n'
                       f'mpi_args = {json.dumps(_mpi_args(test_hosts))}\n')
    done = subprocess.run([sys.executable, "-m", "cloudlab.cli", "run", "ring", "--ranks", "2",
                           "--profile", "lab-mpi", "--json"], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "CLOUDLAB_HOME": str(tmp_path)})
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["backend"] == "ssh" and figures["ranks"] == 2 and figures["went_around"]
    assert all(us > 0 for us in figures["latency_us"])

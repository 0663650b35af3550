"""MPI engines and the ring workload on real Open MPI (Debian's, through mpi4py): a cluster
started as one MPI job, its ranks the engines; the ring's latency and bandwidth; the CLI;
and the errors around them."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest

import cloudlab
from cloudlab.errors import ConfigError
from cloudlab.workloads import ring
from conftest import wait_until_gone


def _need_mpi():
    if shutil.which("mpirun") is None:
        pytest.skip("mpirun is missing (Debian package openmpi-bin)")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        pytest.skip("mpi4py is not installed (pip install mpi4py)")


@pytest.fixture(scope="module")
def mpi_cluster():
    _need_mpi()
    with cloudlab.Cluster(4, mpi=True) as c:
        yield c
    assert wait_until_gone(c.name, 10) == []


def _rank_and_size():
    from mpi4py import MPI

    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size(), os.getpid()


def test_the_engines_are_the_ranks_of_one_mpi_job(mpi_cluster):
    seen = mpi_cluster.run(_rank_and_size)
    assert {eid: (rank, size) for eid, (rank, size, _) in seen.items()} == \
        {0: (0, 4), 1: (1, 4), 2: (2, 4), 3: (3, 4)}
    rows = mpi_cluster.status()
    assert {r.id: r.pid for r in rows} == {eid: pid for eid, (_, _, pid) in seen.items()}
    assert mpi_cluster.map(lambda x: x * 3, range(12)) == [x * 3 for x in range(12)]


def test_an_mpi_cluster_keeps_its_size(mpi_cluster):
    with pytest.raises(ConfigError) as error:
        mpi_cluster.scale(5)
    assert str(error.value) == (f"Cluster {mpi_cluster.name} is one MPI job of 4 ranks, whose "
                                f"size is fixed: stop it and start one of 5 engines.")
    assert len(mpi_cluster.engine_ids) == 4


def test_the_ring_measures_latency_and_bandwidth(mpi_cluster):
    result = ring.measure(mpi_cluster, sizes=[1, 4096, 1 << 20], seconds_per_size=0.05)
    print(f"ring of 4: {result.latency_us[0]:.1f} us/hop at 1 B, "
          f"{result.bandwidth_mb_s[-1]:.0f} MB/s at 1 MiB")
    assert result.went_around and result.ranks == 4 and len(result.hosts) == 4
    assert result.mpi_library.startswith("Open MPI")
    assert all(laps >= 5 for laps in result.laps)
    assert 0 < result.per_hop_us < result.latency_us[-1]  # a big message takes longer
    assert result.bandwidth_mb_s[-1] > 100 * result.bandwidth_mb_s[0]
    assert result.to_dict()["per_hop_latency_us"] == result.per_hop_us


def test_the_ring_needs_an_mpi_cluster(engine):
    with cloudlab.Cluster(2, engine=engine) as c:
        with pytest.raises(ValueError, match=r"is not an MPI job: start one with "
                                             r"Cluster\(4, mpi=True\)"):
            ring.measure(c)


def test_mpi_on_a_backend_that_cannot_start_a_job_says_which_can():
    from cloudlab.backends.base import Backend

    class OneByOne(Backend):  # (a third-party backend without launch_world)
        name, controller_ip = "one-by-one", "127.0.0.1"
        max_engines = launch = terminate = None

    with pytest.raises(ConfigError, match="MPI engines need a backend that starts them as "
                                          "one job, and the one-by-one backend starts each "
                                          "engine on its own"):
        OneByOne(None, "x").check_mpi()


def test_mpi_without_mpi4py_names_the_install(monkeypatch):
    _need_mpi()
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mpi4py" else find_spec(name, *a))
    with pytest.raises(ConfigError) as error:
        cloudlab.Cluster(2, mpi=True)
    assert str(error.value) == ("MPI engines need mpi4py, which this Python lacks: pip install "
                                "mpi4py (or cloudlab's mpi extra, pip install 'cloudlab[mpi]').")


def test_a_dead_rank_is_not_replaced_and_says_why():
    _need_mpi()
    with cloudlab.Cluster(3, engine="dask", mpi=True) as c:
        assert c.run(lambda: __import__("os").getpid())  # (all three answer)
        os.kill(c.status()[1].pid, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while c.death_of(1) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert c.death_of(1) is not None
        time.sleep(1)
        assert c._members.not_replaced.startswith("a rank of an MPI job cannot be replaced")
        assert c.engine_ids == [] or all(eid < 3 for eid in c.engine_ids)
    assert wait_until_gone(c.name, 10) == []


def test_kill_9_of_the_client_ends_the_mpi_job():
    _need_mpi()
    script = ("import time, cloudlab\n"
              "c = cloudlab.Cluster(2, mpi=True).start()\n"
              "print(c.name, c._members.processes[0].world.pid, flush=True)\n"
              "time.sleep(600)\n")
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        name, mpirun = client.stdout.readline().split()
        assert psutil.pid_exists(int(mpirun))
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        assert wait_until_gone(name, 10) == []
        deadline = time.monotonic() + 10
        while psutil.pid_exists(int(mpirun)) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not psutil.pid_exists(int(mpirun)), "mpirun outlived its owner"
    finally:
        client.kill()


def test_cloudlab_run_ring_prints_per_hop_latency():
    _need_mpi()
    done = subprocess.run([sys.executable, "-m", "cloudlab.cli", "run", "ring", "--ranks", "4",
                           "--sizes", "1,65536", "--json"], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["workload"] == "ring" and figures["ranks"] == 4
    assert figures["per_hop_latency_us"] > 0 and figures["sizes"] == [1, 65536]
    bad = subprocess.run([sys.executable, "-m", "cloudlab.cli", "run", "ring", "--ranks", "1"],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr == ("cloudlab run ring: A ring needs at least 2 ranks, not 1: give "
                          "--ranks 2 or more.\n")

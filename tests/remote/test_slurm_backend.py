"""The Slurm backend on a real Slurm (slurmctld here, slurmd in two namespace hosts): both
engine kinds start as jobs, work, scale and stop with nothing left; a queued job's reason is
shown and quoted; a job's time limit is a classified death; bad partitions and kill -9 of
the client are handled."""

import json
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import cloudlab
from cloudlab.errors import ConfigError, ProvisionTimeout
from cloudlab.widgets.status import render_text, snapshot
from conftest import wait_until_gone

LEASE = 3.0


def _options(test_slurm, tmp_path, **overrides):
    return {"backend": "slurm", "client_address": test_slurm.network.client_address,
            "log_dir": str(tmp_path / "logs"), "env_dir": str(test_slurm.env_dir),
            "lease": LEASE, **overrides}


def _live_jobs(test_slurm, cluster: str) -> list[str]:
    return [j for j in test_slurm.jobs()
            if j.endswith(f"cloudlab-{cluster}") and " COMPLETING " not in j]


def _wait(condition, timeout: float) -> float:
    t0 = time.monotonic()
    while not condition() and time.monotonic() - t0 < timeout:
        time.sleep(0.1)
    return time.monotonic() - t0


def test_engines_run_as_jobs_scale_and_stop(test_slurm, tmp_path, engine):
    with cloudlab.Cluster(3, engine=engine, **_options(test_slurm, tmp_path)) as c:
        assert len(_live_jobs(test_slurm, c.name)) == 3
        rows = c.status()
        assert [r.state for r in rows] == ["idle"] * 3
        # Each engine is where Slurm says its job runs, on a node of the test cluster. The
        # backend reads squeue once a second, and squeue can name a job's node after the
        # engine there has registered: read it until it names them all.
        assert {r.host for r in rows} <= set(test_slurm.nodes)
        jobs = [c._members.processes[r.id] for r in rows]
        _wait(lambda: c._backend.refresh() or "(queued)" not in {j.host for j in jobs}, 10)
        assert [r.host for r in rows] == [j.host for j in jobs]
        assert c.map(lambda x: x + 1, range(30)) == list(range(1, 31))
        # The engines run cloudlab's environment in the nodes' shared home, made from the
        # nodes' own Python (they see neither the client's Python nor its venv).
        pythons = set(c.run(lambda: __import__("sys").executable).values())
        assert len(pythons) == 1 and pythons.pop().startswith(str(test_slurm.env_dir))
        c.scale(4)
        assert len(_live_jobs(test_slurm, c.name)) == 4 and len(c.status()) == 4
        c.scale(2)
        assert len(_live_jobs(test_slurm, c.name)) == 2
        assert c.map(lambda x: x * 2, range(10)) == list(range(0, 20, 2))
    assert _live_jobs(test_slurm, c.name) == []
    assert wait_until_gone(c.name, 10) == []
    assert list((tmp_path / "logs").iterdir()) == []  # the jobs' output went with them


def test_a_queued_job_shows_its_reason_and_a_start_past_the_timeout_quotes_it(
        test_slurm, tmp_path):
    # The exclusive partition is one node of 2 cores: a second 2-core engine must wait.
    options = _options(test_slurm, tmp_path, partition="exclusive", cpus_per_engine=2)
    c = cloudlab.Cluster(2, **options).start(min_engines=1)
    try:
        # The reason comes with the scheduler's first look at the job (until then "None").
        _wait(lambda: any(r.state == "queued" and "Resources" in r.note for r in c.status()), 30)
        queued = [r for r in c.status() if r.state == "queued"]
        assert len(queued) == 1 and "Resources" in queued[0].note, c.status()
        text = render_text(snapshot(c))
        assert "queued in Slurm (job" in text and "1 queued" in text
    finally:
        c.stop()
    assert wait_until_gone(c.name, 10) == [] and _live_jobs(test_slurm, c.name) == []

    with pytest.raises(ProvisionTimeout, match=r"1 still wait: queued in Slurm \(job \d+: "
                                               r"Resources\)") as error:
        cloudlab.Cluster(2, start_timeout=8, **options).start()
    assert "nothing is left running" in str(error.value)
    name = str(error.value).split("Cluster ")[-1]
    assert not [j for j in test_slurm.jobs() if "PENDING" in j or "RUNNING" in j], name


def test_an_unknown_partition_is_named_with_the_ones_there_are(test_slurm, tmp_path):
    with pytest.raises(ConfigError) as error:
        cloudlab.Cluster(2, **_options(test_slurm, tmp_path, partition="gpu-xl")).start()
    assert str(error.value) == ("Slurm has no partition 'gpu-xl'; its partitions are debug, "
                                "exclusive: set partition in the profile's [slurm] table to "
                                "one of them.")
    assert test_slurm.jobs() == [] or all("COMPLETING" in j or "COMPLETED" in j
                                          for j in test_slurm.jobs())


def test_bad_slurm_options_say_how_to_fix_them(tmp_path):
    with pytest.raises(ConfigError, match="time_limit is minutes or"):
        cloudlab.Cluster(2, backend="slurm", time_limit="an hour")
    with pytest.raises(ConfigError, match="cpus_per_engine must be"):
        cloudlab.Cluster(2, backend="slurm", cpus_per_engine=0)


def test_a_job_past_its_time_limit_is_a_classified_death_and_is_replaced(test_slurm, tmp_path):
    with cloudlab.Cluster(2, **_options(test_slurm, tmp_path, time_limit="10")) as c:
        job = c._members.processes[0].job_id
        # As if its 10 minutes were up: Slurm ends jobs past their limit every 30 s or so.
        subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=0"], check=True)
        waited = _wait(lambda: c.death_of(0) is not None, 60)
        death = c.death_of(0)
        assert death is not None, f"no death after {waited:.0f} s"
        assert death.cause == (f"reached its Slurm time limit of 10 (job {job}); raise "
                               f"time_limit in the profile's [slurm] table")
        c.wait_for_engines(2, timeout=30)  # and a new job took its place
        assert len(_live_jobs(test_slurm, c.name)) == 2
    assert wait_until_gone(c.name, 10) == []


def test_kill_9_of_the_client_ends_running_engines_and_cancels_queued_jobs(test_slurm, tmp_path):
    """The running engine is frozen (SIGSTOP) first: its lease keeper, a process apart,
    ends it all the same."""
    options = _options(test_slurm, tmp_path, partition="exclusive", cpus_per_engine=2)
    script = (
        "import json, sys, time, cloudlab\n"
        f"c = cloudlab.Cluster(2, **json.loads({json.dumps(json.dumps(options))}))\n"
        "c.start(min_engines=1)\n"
        "import os\n"
        "print(c.name, c.submit(os.getpid).result(), flush=True)\n"
        "time.sleep(600)\n")
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        name, running = client.stdout.readline().split()
        states = sorted(j.split()[1] for j in _live_jobs(test_slurm, name))
        assert states == ["PENDING", "RUNNING"]
        frozen = psutil.Process(int(running))  # (the nodes share this machine's pids)
        assert " ".join(frozen.cmdline()).strip().startswith(f"cloudlab: {name} engine-")
        os.kill(frozen.pid, signal.SIGSTOP)
        assert _wait(lambda: frozen.status() == psutil.STATUS_STOPPED, 5) < 5
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        seconds = _wait(lambda: not _live_jobs(test_slurm, name)
                        and not any(test_slurm.network.cloudlab_processes().values()), 3 * LEASE)
    finally:
        client.kill()
    assert _live_jobs(test_slurm, name) == []
    assert test_slurm.network.cloudlab_processes() == {n: [] for n in test_slurm.nodes}
    print(f"jobs and engines gone {seconds:.2f} s after the kill")
    assert seconds < LEASE  # the lease connection closed: no need to wait out the lease
    assert wait_until_gone(name, 10) == []


def test_a_link_cut_longer_than_the_lease_ends_that_nodes_engines(test_slurm, tmp_path):
    network = test_slurm.network
    cut = network.hosts[1]
    # Each engine fills a node (2 cores), so the second runs on the other node.
    with cloudlab.Cluster(2, replace_dead_engines=False,
                          **_options(test_slurm, tmp_path, cpus_per_engine=2)) as c:
        assert {r.host for r in c.status()} == set(test_slurm.nodes)
        network.cut(cut)
        try:
            seconds = _wait(lambda: not network.cloudlab_processes()[cut.name], 4 * LEASE)
        finally:
            network.restore(cut)
        assert network.cloudlab_processes()[cut.name] == [], "engines outlived their lease"
        assert LEASE * 0.75 <= seconds <= LEASE * 2 + 1
        assert network.cloudlab_processes()[network.hosts[0].name]
    assert wait_until_gone(c.name, 10) == []


def test_gpus_on_slurm_say_how_to_ask_slurm_for_them(test_slurm, tmp_path):
    # (Not this client's GPUs: the test machine's stand-in would not be the nodes' either.)
    c = cloudlab.Cluster(2, gpus="all", **_options(test_slurm, tmp_path))
    with pytest.raises(ConfigError, match=r"--gpus all asks for GPUs, but cloudlab does not "
                                          r"ask Slurm for GPUs yet \(sbatch_args"):
        c.start()
    assert _live_jobs(test_slurm, c.name) == []


def test_a_frozen_engine_during_map_costs_no_result_and_its_job_ends(test_slurm, tmp_path):
    """The fault matrix's rule as a job: found silent after heartbeat_timeout, its job
    cancelled (Slurm's SIGKILL ends a stopped process), its pieces run again."""
    network = test_slurm.network
    with cloudlab.Cluster(2, heartbeat_timeout=3, replace_dead_engines=False,
                          **_options(test_slurm, tmp_path)) as c:
        victim = next(r for r in c.status() if r.id == c.engine_ids[1])
        threading.Timer(1.0, os.kill, (victim.pid, signal.SIGSTOP)).start()  # (one pid space)
        squares = c.map(lambda x: time.sleep(0.3) or x * x, range(30), chunksize=1)
        assert squares == [x * x for x in range(30)]
        assert [(d.engine, d.cause) for d in c.deaths] == [
            (victim.id, "stopped answering for 3 s (SIGSTOP, a frozen VM or a cut link)")]
        assert _wait(lambda: not any(victim.pid in pids for pids in
                                     network.cloudlab_processes().values()), 15) < 15
    assert wait_until_gone(c.name, 10) == []

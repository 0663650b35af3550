"""The SSH backend on real sshd, engines in network-namespace hosts: both engine kinds start,
work and stop there, leave nothing behind, and end themselves when their link stays cut
longer than the lease."""

import importlib
import os
import shutil
import sys
import threading
import time

import psutil
import pytest

import cloudlab
from cloudlab.backends.ssh_hosts import HostError
from conftest import wait_until_gone
from hosts import CHECKOUT, SSH_PORT, network_of

LEASE = 2.0


def _options(test_hosts, **overrides):
    return {"backend": "ssh", "hosts": [f"root@{h.address}:{SSH_PORT}" for h in test_hosts.hosts],
            "identity_file": str(test_hosts.user_key),
            "known_hosts": str(test_hosts.known_hosts), "lease": LEASE, **overrides}


def test_engines_start_work_and_stop_on_the_hosts(test_hosts, engine):
    with cloudlab.Cluster(4, engine=engine, **_options(test_hosts)) as c:
        rows = c.status()
        assert [r.state for r in rows] == ["idle"] * 4
        ours = network_of(os.getpid())
        host_namespaces = {network_of(r.pid) for r in rows}
        assert len(host_namespaces) == 2 and ours not in host_namespaces  # two per host
        assert c.map(lambda x: x * x, range(20)) == [x * x for x in range(20)]
        c.push(scale=3)
        assert set(c.run(lambda: scale * 2).values()) == {6}  # noqa: F821
        # The second host has its own runtime folder: the engines' files were copied there.
        private = test_hosts.hosts[1]
        assert private.ssh(f"test -d {c._workdir}").returncode == 0
        marker = private.private[0] / f"not-shared-{os.getpid()}"
        marker.touch()
        try:  # (a file here is not there: the folder is not shared)
            assert private.ssh(f"test -e {marker}").returncode == 1
        finally:
            marker.unlink()
    assert private.ssh(f"test -e {c._workdir}").returncode == 1  # and removed at stop
    assert wait_until_gone(c.name, 10) == []
    deadline = time.monotonic() + 10
    while any(test_hosts.cloudlab_processes().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert test_hosts.cloudlab_processes() == {h.name: [] for h in test_hosts.hosts}


def test_a_link_cut_longer_than_the_lease_ends_that_hosts_engines(test_hosts, engine):
    cut = test_hosts.hosts[1]
    with cloudlab.Cluster(2, engine=engine, replace_dead_engines=False,
                          **_options(test_hosts)) as c:
        assert len(test_hosts.cloudlab_processes()[cut.name]) >= 1
        test_hosts.cut(cut)
        try:
            t0 = time.monotonic()
            while test_hosts.cloudlab_processes()[cut.name] and time.monotonic() - t0 < 4 * LEASE:
                time.sleep(0.1)
            seconds = time.monotonic() - t0
        finally:
            test_hosts.restore(cut)
        assert test_hosts.cloudlab_processes()[cut.name] == [], "engines outlived their lease"
        assert LEASE * 0.75 <= seconds <= LEASE * 2 + 1
        assert test_hosts.cloudlab_processes()[test_hosts.hosts[0].name]  # the other host's keeps on
    assert wait_until_gone(c.name, 10) == []


def test_a_bad_host_is_named_before_anything_starts(test_hosts, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostError, match="its host key is not the one"):
        cloudlab.Cluster(2, **_options(test_hosts, known_hosts=str(empty))).start()
    assert test_hosts.cloudlab_processes() == {h.name: [] for h in test_hosts.hosts}


def test_kill_9_of_the_client_ends_the_remote_engines_a_frozen_one_too(test_hosts):
    """A frozen engine (SIGSTOP) cannot act on its lease: its lease keeper, a process
    apart, does."""
    import json
    import signal
    import subprocess
    import sys

    script = (
        "import json, sys, time, cloudlab\n"
        f"c = cloudlab.Cluster(2, **json.loads({json.dumps(json.dumps(_options(test_hosts)))}))\n"
        "c.start()\n"
        "print(c.name, *(r.pid for r in c.status()), flush=True)\n"
        "time.sleep(600)\n")
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        name, *pids = client.stdout.readline().split()
        assert name and all(test_hosts.cloudlab_processes().values())
        frozen = psutil.Process(int(pids[1]))  # (the hosts share this machine's pids)
        assert " ".join(frozen.cmdline()).strip().startswith(f"cloudlab: {name} engine-")
        os.kill(frozen.pid, signal.SIGSTOP)
        while frozen.status() != psutil.STATUS_STOPPED:
            time.sleep(0.01)
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        t0 = time.monotonic()
        while any(test_hosts.cloudlab_processes().values()) and time.monotonic() - t0 < 2 * LEASE:
            time.sleep(0.05)
        seconds = time.monotonic() - t0
    finally:
        client.kill()
    assert test_hosts.cloudlab_processes() == {h.name: [] for h in test_hosts.hosts}
    print(f"remote engines gone {seconds:.2f} s after the kill")
    assert seconds < LEASE  # at once: ssh closed their input, no need to wait out the lease
    assert wait_until_gone(name, 10) == []


def test_the_controller_can_run_on_a_host_too(test_hosts, engine):
    # The second host does not share the client's runtime folder: the controller's files
    # come back here, and go on to the first host's engines, by ssh.
    far = test_hosts.hosts[1]
    options = _options(test_hosts, controller_host=f"root@{far.address}:{SSH_PORT}")
    with cloudlab.Cluster(3, engine=engine, **options) as c:
        assert c.map(lambda x: -x, range(9)) == [-x for x in range(9)]
        controller = [p.pid for p in psutil.process_iter(["cmdline"])
                      if " ".join(p.info["cmdline"] or []).strip() in (
                          f"cloudlab: {c.name} controller", f"cloudlab: {c.name} scheduler")]
        assert controller and all(pid in test_hosts.cloudlab_processes()[far.name]
                                  for pid in controller)
        assert network_of(controller[0]) != network_of(os.getpid())
    assert wait_until_gone(c.name, 10) == []
    deadline = time.monotonic() + 10
    while any(test_hosts.cloudlab_processes().values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert test_hosts.cloudlab_processes() == {h.name: [] for h in test_hosts.hosts}
    assert far.ssh(f"test -e {c._workdir}").returncode == 1


def test_a_controller_on_a_host_is_reached_through_ssh_tunnels(test_hosts, engine):
    far = test_hosts.hosts[1]
    options = _options(test_hosts, controller_host=f"root@{far.address}:{SSH_PORT}",
                       tunnel=True)
    with cloudlab.Cluster(2, engine=engine, **options) as c:
        assert c.map(lambda x: x + 100, range(6)) == [x + 100 for x in range(6)]
        # This client talks to the controller only through local ends of its tunnels.
        peers = {conn.raddr.ip for conn in psutil.Process().net_connections("tcp")
                 if conn.raddr and conn.status == "ESTABLISHED"}
        assert far.address not in peers and "127.0.0.1" in peers
    assert wait_until_gone(c.name, 10) == []
    assert not [p for p in psutil.process_iter(["cmdline"])
                if "ExitOnForwardFailure=yes" in (p.info["cmdline"] or [])], "a tunnel was left"


def test_the_users_own_module_reaches_the_hosts_and_its_edits_follow(test_hosts, engine):
    # Beside the "script", in a folder of the client's checkout, which no host sees.
    folder = CHECKOUT / "test-artifacts" / f"usercode-{os.getpid()}-{engine}"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"mytools_{engine}"
    source = folder / f"{name}.py"
    source.write_text("def triple(x):\n    return 3 * x\n")
    data = folder / "data.txt"
    data.write_text("a file of the client's\n")
    sys.path.insert(0, str(folder))
    try:
        mytools = importlib.import_module(name)
        with cloudlab.Cluster(2, engine=engine, **_options(test_hosts)) as c:
            assert c.run(os.path.exists, str(source)) == {0: False, 1: False}
            assert c.map(mytools.triple, range(5)) == [0, 3, 6, 9, 12]
            assert name in c.code.modules
            source.write_text("def triple(x):\n    return 30 * x\n")
            assert name in c.sync().modules
            assert c.map(mytools.triple, range(5)) == [0, 30, 60, 90, 120]
            source.write_text("def triple(x):\n    return 300 * x\n")  # seen unasked
            assert c.submit(mytools.triple, 1).result(timeout=30) == 300
            assert set(c.run(mytools.triple, 2).values()) == {600}
            # A data file beside it does not travel: the error says to push it.
            with pytest.raises(cloudlab.RemoteError, match=r"FileNotFoundError: .*data.txt.*: "
                               r"that file is on this client, not where the engines run "
                               r"\(files do not travel with code\): read it here and push "
                               r"the data, c.push\(name=value\)"):
                c.run(lambda: open(data).read())
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)
        shutil.rmtree(folder)


def test_a_python_of_the_users_in_a_bare_venv_is_what_the_environment_is_made_from(
        test_hosts):
    # As a user names it: python = the host's own venv, which has nothing installed.
    for host in test_hosts.hosts:
        made = host.ssh("rm -rf /root/bare && /usr/bin/python3 -m venv /root/bare && "
                        "/root/bare/bin/python -c 'import cloudlab'")
        assert "No module named 'cloudlab'" in made.stderr
    with cloudlab.Cluster(2, **_options(test_hosts, python="/root/bare/bin/python")) as c:
        pythons = set(c.run(lambda: __import__("sys").executable).values())
        assert len(pythons) == 1 and pythons.pop().startswith("/root/.cache/cloudlab/envs/")
        assert c.map(abs, range(-2, 2)) == [2, 1, 0, 1]
    for host in test_hosts.hosts:  # the user's venv is left as it was
        assert host.ssh("/root/bare/bin/python -m pip list --format=freeze").stdout.split() \
            == host.ssh("/usr/bin/python3 -m venv /tmp/fresh && /tmp/fresh/bin/python -m pip "
                        "list --format=freeze; rm -rf /tmp/fresh").stdout.split()


def test_a_frozen_remote_engine_ends_run_in_one_sentence_and_is_killed_there(test_hosts, engine):
    """The fault matrix's rule on a host: found silent after heartbeat_timeout, ended where it
    runs (SIGKILL, through ssh), replaced; the call names it."""
    with cloudlab.Cluster(2, engine=engine, heartbeat_timeout=3, **_options(test_hosts)) as c:
        row = next(r for r in c.status() if r.id == c.engine_ids[1])
        processes = test_hosts.cloudlab_processes()
        host = next(h for h in test_hosts.hosts if row.pid in processes[h.name])
        threading.Timer(1.0, host.ssh, (f"kill -STOP {row.pid}",)).start()
        t0 = time.monotonic()
        with pytest.raises(cloudlab.EngineLost, match=rf"^run <lambda> did not finish on every engine: "
                                                      rf"engine {row.id} stopped answering for "
                                                      rf"3 s \(SIGSTOP, a frozen VM or a cut "
                                                      rf"link\); engine \d+ answered"):
            c.run(lambda: time.sleep(2))
        assert time.monotonic() - t0 < 3 + 6
        t0 = time.monotonic()  # then ended on its host, and replaced
        while host.ssh(f"kill -0 {row.pid}").returncode == 0 and time.monotonic() - t0 < 10:
            time.sleep(0.2)
        assert host.ssh(f"kill -0 {row.pid}").returncode != 0, "still on its host"
        while len(c._members.usable()) < 2 and time.monotonic() - t0 < 30:
            time.sleep(0.1)
        assert len(c.run(os.getpid)) == 2  # replaced
    assert wait_until_gone(c.name, 10) == []


def test_a_cut_link_during_map_costs_no_result(test_hosts, engine):
    cut = test_hosts.hosts[1]
    with cloudlab.Cluster(4, engine=engine, heartbeat_timeout=3, replace_dead_engines=False,
                          **_options(test_hosts)) as c:
        threading.Timer(1.0, test_hosts.cut, (cut,)).start()
        try:
            squares = c.map(lambda x: time.sleep(0.3) or x * x, range(40), chunksize=1)
            assert squares == [x * x for x in range(40)]
        finally:
            time.sleep(1.5)  # (the timer has fired)
            test_hosts.restore(cut)
        assert {d.cause for d in c.deaths} == {
            "stopped answering for 3 s (SIGSTOP, a frozen VM or a cut link)"}
    assert wait_until_gone(c.name, 10) == []

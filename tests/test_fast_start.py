"""The fast paths of a start (fork server, partial readiness) give what the plain path gives."""

import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

import cloudlab
from cloudlab import _aio
from cloudlab.backends import forking
from cloudlab.errors import StartError
from conftest import launched, our_processes, wait_until_gone


def engine_facts():
    """What a task on an engine sees of its process: the same, forked or not."""
    import random

    import dask.config
    import numpy as np

    return {
        "dask_config": dask.config.get("cloudlab_test.probe", None),
        "cwd": os.getcwd(),
        "cluster": os.environ["CLOUDLAB_CLUSTER"],
        "threads": os.environ["OMP_NUM_THREADS"],
        # Its own process group: it leads it, or its lease keeper (a fresh one's) does.
        "own_group": os.getpgid(0) in (os.getpid(), os.getppid()),
        "stdin_is_devnull": os.path.samefile("/proc/self/fd/0", os.devnull),
        "draws": (random.random(), float(np.random.random())),
    }


@pytest.mark.parametrize("fork_server", [True, False], ids=["forked", "fresh"])
def test_forked_engines_are_what_fresh_ones_are(engine, fork_server, tmp_path, monkeypatch):
    cloudlab.prewarm(engine).result()
    # Set after the fork server imported everything: a forked process must still see them.
    monkeypatch.setenv("DASK_CLOUDLAB_TEST__PROBE", "7")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "helper_module.py").write_text("def triple(x):\n    return 3 * x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import helper_module

    with cloudlab.Cluster(3, engine=engine, fork_server=fork_server) as c:
        facts = c.run(engine_facts)
        assert c.map(helper_module.triple, range(1000)) == [3 * x for x in range(1000)]
        c.push(offset=5)
        assert c.map(lambda x: x + offset, [1, 2]) == [6, 7]  # noqa: F821 (pushed)
        forked = [p for p in launched(c.name) if p.ppid() != os.getpid()]
    for fact in facts.values():
        assert fact["cwd"] == str(tmp_path)
        assert fact["dask_config"] == 7
        assert fact["cluster"] == c.name and fact["threads"] == "1"
        assert fact["own_group"] and fact["stdin_is_devnull"]
    # Each engine draws its own random numbers: a fork must not copy its siblings' seed.
    draws = [f["draws"] for f in facts.values()]
    assert len({d[0] for d in draws}) == len({d[1] for d in draws}) == 3
    # Forked processes are the fork server's children; fresh ones are ours.
    assert len(forked) == (4 if fork_server else 0)
    assert wait_until_gone(c.name, 5) == []


def test_one_fork_server_serves_every_cluster_of_a_process_and_outlives_them(engine):
    with cloudlab.Cluster(1, engine=engine) as first:
        parents = {p.ppid() for p in launched(first.name)}
    with cloudlab.Cluster(1, engine=engine) as second:
        assert {p.ppid() for p in launched(second.name)} == parents
    (server,) = parents
    title = " ".join(psutil.Process(server).cmdline()).strip()
    assert title.startswith("cloudlab fork server") and title.endswith(f"of pid {os.getpid()}")


def test_a_reused_pid_is_not_taken_for_a_process_that_has_exited(engine):
    """The fork server outlives thousands of children, and pids wrap around (pid_max can be
    32768): an exit code kept for a pid belongs to an older child, not to a new one with
    the same pid, whose start would otherwise fail at once as "exited before it was ready"."""
    with cloudlab.Cluster(1, engine=engine):
        pass
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    for server in forking._servers.values():
        server.exit_codes.update(dict.fromkeys(range(2, pid_max + 1), 0))  # every pid: "exited"
    with cloudlab.Cluster(2, engine=engine) as c:
        assert c.map(abs, [-1, -2]) == [1, 2]
        assert all(p.alive() for p in c._members.processes.values())


def test_start_can_return_on_the_first_engine_and_the_rest_join(engine):
    with cloudlab.Cluster(6, engine=engine) as c:
        pass
    c = cloudlab.Cluster(6, engine=engine)
    try:
        c.start(min_engines=1)
        assert c.state == "running"
        # map and submit run on what is there; results are whole and ordered.
        assert c.map(abs, range(-500, 500)) == [abs(x) for x in range(-500, 500)]
        # push and run reach every engine: they wait for the ones still joining.
        c.push(token=42)
        assert c.run(lambda: token) == dict.fromkeys(range(6), 42)  # noqa: F821 (pushed)
        c.wait_for_engines()
        states = [r.state for r in c.status()]
        assert set(states) <= {"idle", "busy"} and len(states) == 6  # busy: counts can lag
    finally:
        c.stop()
    assert wait_until_gone(c.name, 5) == []


def test_stop_while_engines_are_still_joining_leaves_nothing(engine):
    c = cloudlab.Cluster(8, engine=engine)
    c.start(min_engines=1)
    c.stop()
    assert c.state == "stopped"
    assert wait_until_gone(c.name, 5) == []


def test_min_engines_must_be_a_positive_whole_number():
    c = cloudlab.Cluster(2)
    with pytest.raises(ValueError, match="min_engines must be a whole number from 1 to 2"):
        c.start(min_engines=0)
    assert c.state == "new" and our_processes(c.name) == []


def test_a_fork_server_that_cannot_import_its_engine_says_why(tmp_path):
    log = tmp_path / "server.log"

    async def start():
        return await forking.get(sys.executable, ("no_such_engine_module",), dict(os.environ),
                                    log)

    with pytest.raises(StartError, match="No module named 'no_such_engine_module'"):
        _aio.run(start())
    assert not log.exists()  # read for the message, then removed


def test_a_fork_server_ends_when_its_owner_is_killed(tmp_path):
    import subprocess

    owner = subprocess.Popen([sys.executable, "-c", (
        "import cloudlab, time\n"
        "cloudlab.prewarm('dask').result()\n"
        "print('ready', flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert owner.stdout.readline().strip() == "ready"
        servers = [p for p in psutil.Process(owner.pid).children()
                   if "fork server" in " ".join(p.cmdline())]
        assert len(servers) == 1
        owner.send_signal(signal.SIGKILL)
        owner.wait()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 5 and alive(servers[0]):
            time.sleep(0.005)
        assert not alive(servers[0]), "the fork server outlived its owner"
        print(f"fork server gone {time.monotonic() - t0:.3f} s after its owner")
    finally:
        owner.kill()


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_connection_files_are_read_only_once_whole(tmp_path):
    """Engines and client start alongside their controller, which writes its file in pieces."""
    import json
    import threading

    from cloudlab.engines.base import wait_for_file

    path = tmp_path / "connection.json"
    path.write_text('{"key": "abc", "ports": [1, ')  # half written
    threading.Timer(0.2, lambda: path.write_text(json.dumps({"key": "abc", "ports": [1, 2]}))).start()
    t0 = time.monotonic()
    _aio.run(wait_for_file(path, lambda: True, 5, "controller"))
    assert time.monotonic() - t0 >= 0.15
    assert json.loads(path.read_text())["ports"] == [1, 2]


def test_without_pidfds_engines_start_fresh(monkeypatch):
    monkeypatch.delattr(os, "pidfd_open")  # as on macOS: no fork server there
    with cloudlab.Cluster(2) as c:
        assert {p.ppid() for p in launched(c.name)} == {os.getpid()}
        assert c.map(abs, [-1, -2]) == [1, 2]
    assert wait_until_gone(c.name, 5) == []


def test_a_controller_that_exits_while_starting_is_quoted(monkeypatch):
    """Its exit code and last line, rather than only that it exited."""
    import dataclasses

    from cloudlab.engines.ipp import IPyParallelEngine

    command = IPyParallelEngine.controller_command

    def unbindable(self):  # an address that is not this machine's: the bind fails
        c = command(self)
        return dataclasses.replace(c, args=tuple("--ip=203.0.113.1" if a.startswith("--ip=")
                                                 else a for a in c.args))

    monkeypatch.setattr(IPyParallelEngine, "controller_command", unbindable)
    with pytest.raises(StartError) as error:
        cloudlab.Cluster(2).start()
    assert str(error.value).startswith(
        "The ipyparallel controller exited before it was ready (exit code 1, last output: "
        "zmq.error.ZMQError: Cannot assign requested address")
    assert str(error.value).endswith("); nothing is left running.")
    assert wait_until_gone(timeout=10, servers=False) == []

"""Owners and controllers that die: nothing is left behind, and the next start works."""

from __future__ import annotations

import os
import re
import signal
import time

import psutil
import pytest
from jupyter_client.manager import start_new_kernel

import cloudlab
from chaos_helpers import kill, wait_for
from conftest import launched, wait_until_gone
from kernels import execute


@pytest.mark.slow
def test_kill_9_of_a_kernel_in_the_middle_of_a_map_leaves_nothing_after_10_s(engine, reliability):
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        execute(client, f"%load_ext cloudlab\n%cluster start 4 --engine {engine}")
        name = execute(client, "print(cluster.name)").strip()
        execute(client, "import time\ndef nap(s):\n    time.sleep(s)\n    return s")
        client.execute("cluster.map(nap, [30] * 8, chunksize=1)")
        time.sleep(2)  # the map runs on every engine
        assert len(launched(name)) == 5
        os.kill(manager.provisioner.process.pid, signal.SIGKILL)
        t0 = time.monotonic()
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    survivors = wait_until_gone(name, 10)
    assert survivors == [], [p.cmdline() for p in survivors]
    gone = time.monotonic() - t0
    assert wait_until_gone(timeout=5) == []  # the kernel's fork servers too
    reliability("kernel killed (kill -9) during a map", engine, "every process gone", gone)


def test_a_killed_controller_ends_the_cluster_and_a_new_start_works(engine, reliability):
    c = cloudlab.Cluster(2, engine=engine)
    c.start()
    kill(c._members.controller.pid)
    t0 = time.monotonic()
    noticed = wait_for(lambda: c.state == "dead", 5)
    assert wait_until_gone(c.name, 10) == []  # its engines were stopped
    gone = time.monotonic() - t0
    assert "its controller was killed by signal 9 (SIGKILL)" in c.end_cause
    with pytest.raises(cloudlab.ClusterStateError, match=r"is dead: its controller was killed"):
        c.map(abs, [1])
    c.stop()  # nothing to do, and no error
    assert c.state == "dead"
    with cloudlab.Cluster(2, engine=engine) as again:
        assert again.map(abs, [-1, -2]) == [1, 2]
    reliability("controller killed (kill -9)", engine,
                f"cluster dead after {noticed:.2f} s, engines stopped", gone)


@pytest.mark.parametrize("fork_server", [True, False], ids=["forked", "fresh"])
def test_a_frozen_engine_ends_with_its_killed_owner(engine, fork_server, reliability):
    """SIGSTOP freezes the engine, not what holds its lease: the fork server, or (in a fresh
    interpreter) its lease keeper, ends it when its owner dies (SIGKILL ends a stopped
    process)."""
    import subprocess
    import sys

    owner = subprocess.Popen(
        [sys.executable, "-c", "import time, cloudlab\n"
         f"c = cloudlab.Cluster(2, engine={engine!r}, fork_server={fork_server}).start()\n"
         "print(c.name, *(r.pid for r in c.status()), flush=True)\n"
         "time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        name, *pids = owner.stdout.readline().split()
        frozen = psutil.Process(int(pids[1]))  # the engine itself, as c.status() says
        assert re.fullmatch(rf"cloudlab: {name} engine-\d+", " ".join(frozen.cmdline()).strip())
        kill(frozen.pid, signal.SIGSTOP)
        assert wait_for(lambda: frozen.status() == psutil.STATUS_STOPPED, 5) < 5
        kill(owner.pid)
        t0 = time.monotonic()
        owner.wait(10)
        survivors = wait_until_gone(name, 10)
        assert survivors == [], [(p.pid, p.status()) for p in survivors]
        reliability("an engine frozen (SIGSTOP), then its owner killed (kill -9)"
                    + ("" if fork_server else ", fork_server = false"), engine,
                    "every process gone, the frozen one too", time.monotonic() - t0)
    finally:
        owner.kill()
        owner.wait()
    assert wait_until_gone(timeout=5) == []  # its fork servers too

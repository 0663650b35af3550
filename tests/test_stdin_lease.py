"""The lease a remote owner holds: heartbeats on an engine's standard input (cloudlab.onhost.agent
--lease). Here the owner is this test, writing to a pipe; over SSH it is the client,
writing through the ssh connection. And the same lease over a TCP connection the engine
opens to its owner (--lease-from), as a Slurm job's engine does: here the owner is a
LeaseServer in this test."""

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

LEASE = 1.0


NAP = ("import subprocess, sys, time; "
       "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
       "time.sleep(60)")


def _start(lease: float = LEASE, lease_from: str | None = None,
           env: dict | None = None, code: str = NAP) -> subprocess.Popen:
    """An agent whose entry (timeit's command line, running one statement: by default,
    start a child in its process group and sleep a minute) runs under a lease on its stdin.
    The agent is the lease keeper; the engine, its child."""
    return subprocess.Popen(
        [sys.executable, "-m", "cloudlab.onhost.agent", "--lease", str(lease),
         *(["--lease-from", lease_from] if lease_from else []), "--title",
         "cloudlab: lease-test engine-0", "timeit:main", "--", "-n", "1", "-r", "1", code],
        stdin=subprocess.PIPE, start_new_session=True, env={**os.environ, **(env or {})})


def _group(pgid: int) -> list[psutil.Process]:
    return [p for p in psutil.process_iter() if _pgid(p) == pgid and p.status() != "zombie"]


def _pgid(p: psutil.Process) -> int | None:
    try:
        return os.getpgid(p.pid)
    except (ProcessLookupError, psutil.Error):
        return None


def _wait_gone(agent: subprocess.Popen, timeout: float) -> float:
    """When the agent and its whole group were gone (time.monotonic())."""
    agent.wait(timeout)
    gone = time.monotonic()
    deadline = time.monotonic() + 5
    while _group(agent.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _group(agent.pid) == [], "a process of the engine's group outlived its lease"
    return gone


def _beat(agent: subprocess.Popen, seconds: float) -> float:
    """Heartbeats every quarter lease for ``seconds``; when the last one was sent."""
    end = time.monotonic() + seconds
    while True:
        agent.stdin.write(b"\n")
        agent.stdin.flush()
        last = time.monotonic()
        if last > end:
            return last
        time.sleep(LEASE / 4)


def test_heartbeats_keep_the_engine_and_silence_ends_it_within_a_lease():
    agent = _start()
    try:
        last = _beat(agent, 3 * LEASE)  # three leases: alive only thanks to the heartbeats
        assert agent.poll() is None and len(_group(agent.pid)) == 3  # keeper, engine, its child
        seconds = _wait_gone(agent, 5) - last  # the link is "cut": no more heartbeats
    finally:
        agent.kill()
    assert agent.returncode == -9
    assert LEASE * 0.9 <= seconds <= LEASE + 1.0


def test_each_heartbeat_touches_the_lease_file_a_vm_watches(tmp_path):
    lease_file = tmp_path / "lease"
    lease_file.touch()
    os.utime(lease_file, (0, 0))
    agent = _start(lease=30, env={"CLOUDLAB_LEASE_FILE": str(lease_file)})
    try:
        last = _beat(agent, 0.5)
        time.sleep(0.2)
        assert abs(lease_file.stat().st_mtime - (time.time() - (time.monotonic() - last))) < 1
    finally:
        agent.kill()


def test_a_closed_input_ends_the_engine_at_once():
    agent = _start(lease=30)
    try:
        _beat(agent, 0.5)
        agent.stdin.close()  # the owner, or its ssh, is gone
        closed = time.monotonic()
        seconds = _wait_gone(agent, 5) - closed
    finally:
        agent.kill()
    assert seconds < 1.0


def test_an_agent_needs_exactly_one_kind_of_owner():
    both = subprocess.run([sys.executable, "-m", "cloudlab.onhost.agent", "--lease", "1",
                           "--owner-pid", "1", "timeit:main"], capture_output=True, text=True)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr
    neither = subprocess.run([sys.executable, "-m", "cloudlab.onhost.agent", "timeit:main"],
                             capture_output=True, text=True)
    assert neither.returncode == 2 and "one of the arguments --owner-pid --lease is required" \
        in neither.stderr


def test_a_lease_server_keeps_engines_that_connect_and_closing_it_ends_them():
    from cloudlab.backends.remote import LeaseServer

    server = LeaseServer("127.0.0.1", LEASE / 4)
    agent = _start(lease_from=server.address)
    try:
        time.sleep(3 * LEASE)  # three leases: alive only thanks to the server's heartbeats
        assert agent.poll() is None and len(_group(agent.pid)) == 3  # keeper, engine, its child
        server.close()  # as when the client dies: the kernel closes its sockets
        closed = time.monotonic()
        seconds = _wait_gone(agent, 5) - closed
    finally:
        agent.kill()
        server.close()
    assert seconds < LEASE / 2


def test_an_owner_that_is_gone_already_ends_the_engine_at_once():
    import socket

    with socket.socket() as s:  # a port nobody listens on: the client has gone
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agent = _start(lease=30, lease_from=f"127.0.0.1:{port}")
    try:
        started = time.monotonic()
        seconds = _wait_gone(agent, 10) - started
    finally:
        agent.kill()
    assert agent.returncode == -9 and seconds < 5


def _engine(agent: subprocess.Popen) -> psutil.Process:
    """The engine its keeper forked, once it runs its entry (its title set)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        kept = psutil.Process(agent.pid).children()
        if kept and kept[0].name().startswith("cloudlab:"):
            return kept[0]
        time.sleep(0.02)
    raise AssertionError("the keeper forked no engine")


def test_a_frozen_engine_is_ended_by_its_keeper_when_the_lease_lapses():
    """A thread of the engine would freeze with it (SIGSTOP); its keeper does not."""
    agent = _start()
    try:
        _beat(agent, 0.5)
        engine = _engine(agent)
        assert " ".join(psutil.Process(agent.pid).cmdline()).strip() \
            == "cloudlab: lease-test engine-0 (lease keeper)"
        os.kill(engine.pid, signal.SIGSTOP)
        last = _beat(agent, 2 * LEASE)  # the keeper keeps the lease meanwhile
        assert engine.status() == psutil.STATUS_STOPPED and agent.poll() is None
        seconds = _wait_gone(agent, 5) - last  # then the owner dies, or the link is cut
    finally:
        agent.kill()
    assert agent.returncode == -9
    assert LEASE * 0.9 <= seconds <= LEASE + 1.0


@pytest.mark.parametrize("code,returncode", [
    ("import os; os._exit(3)", 3), ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", -11),
    ("import time; time.sleep(0.5)", 0)])
def test_the_keeper_ends_as_its_engine_ended(code, returncode):
    """Whoever started the agent (a backend, sshd, slurmstepd) reads the engine's end in
    the keeper's, as if there were no keeper."""
    agent = _start(lease=30, code=code)
    try:
        agent.wait(10)
    finally:
        agent.kill()
    assert agent.returncode == returncode


def test_a_killed_keeper_takes_its_engine_with_it():
    agent = _start(lease=30)
    try:
        _beat(agent, 0.2)
        engine = _engine(agent)
        os.kill(agent.pid, signal.SIGKILL)
        agent.wait(5)
        engine.wait(5)  # (psutil.TimeoutExpired if it lives on)
    finally:
        agent.kill()

"""The lease a remote owner holds: heartbeats on an engine's standard input (cloudlab.onhost.agent
--lease). Here the owner is this test, writing to a pipe; over SSH it is the client,
writing through the ssh connection. And the same lease over a TCP connection the engine
opens to its owner (--lease-from), as a Slurm job's engine does: here the owner is a
LeaseServer in this test."""

import os
import subprocess
import sys
import time

import psutil

LEASE = 1.0


def _start(lease: float = LEASE, lease_from: str | None = None,
           env: dict | None = None) -> subprocess.Popen:
    """An agent whose entry (timeit's command line, running one statement) starts a child
    in its process group and sleeps a minute, under a lease on its stdin."""
    code = ("import subprocess, sys, time; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "time.sleep(60)")
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
        assert agent.poll() is None and len(_group(agent.pid)) == 2
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
        assert agent.poll() is None and len(_group(agent.pid)) == 2
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

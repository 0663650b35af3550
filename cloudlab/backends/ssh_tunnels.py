"""A port of this client, reachable on every host's own loopback through SSH.

For a service the client runs for its engines (the classifier's queue) where the hosts
cannot reach the client (a controller on a host of its own, cloud VMs whose network rules
let nothing in but SSH): each host gets a reverse forward, ``ssh -R
127.0.0.1:REMOTE:127.0.0.1:PORT``, over a connection of its own that the client already
may open. Every host gets the same REMOTE port, so one URL serves every engine. Nothing
listens beyond each host's loopback, and the forwards end with the ``with`` block, or when
this client dies (the session reads its input until it closes).
"""

from __future__ import annotations

import contextlib
import random
import select
import subprocess
import time

from ..errors import StartError
from .ssh_hosts import SshHost, ssh_command

TRIES = 5  # remote ports tried before giving up (one taken on a host: another for all)
WAIT = 30.0  # seconds for every forward to be in place


@contextlib.contextmanager
def reverse(hosts: list[SshHost], port: int, identity_file: str, known_hosts: str):
    """Yield the port at which 127.0.0.1 on every one of ``hosts`` reaches this client's
    127.0.0.1:``port``, while the block runs."""
    for _ in range(TRIES):
        remote = random.randint(20000, 60000)
        tunnels = [_open(h, remote, port, identity_file, known_hosts) for h in hosts]
        try:
            taken = _wait(tunnels, hosts)
            if not taken:
                yield remote
                return
        finally:
            for tunnel in tunnels:
                assert tunnel.stdin is not None  # a pipe: see _open
                tunnel.stdin.close()
                tunnel.kill()
                tunnel.wait()
    raise StartError(f"Could not forward a port to {', '.join(map(str, hosts))} over SSH: "
                     f"{TRIES} ports were taken there.")


def _open(host: SshHost, remote: int, port: int, identity_file: str,
          known_hosts: str) -> subprocess.Popen:
    argv = ssh_command(host, "echo ready; cat > /dev/null", identity_file, known_hosts)
    # The server takes the forward before it runs the session's command: "ready" means it
    # is in place, and a refused forward ends ssh first.
    argv = [argv[0], "-o", "ExitOnForwardFailure=yes",
            "-R", f"127.0.0.1:{remote}:127.0.0.1:{port}", *argv[1:]]
    return subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)


def _wait(tunnels: list[subprocess.Popen], hosts: list[SshHost]) -> bool:
    """Wait until every forward is in place: False; True where a host had the port taken
    (try another); a sentence for any other failure."""
    deadline = time.monotonic() + WAIT
    for tunnel, host in zip(tunnels, hosts):
        assert tunnel.stdout is not None and tunnel.stderr is not None  # pipes: see _open
        ready, _, _ = select.select([tunnel.stdout], [], [], max(0.0, deadline - time.monotonic()))
        if ready and tunnel.stdout.readline().strip() == b"ready":
            continue
        tunnel.kill()
        said = tunnel.stderr.read().decode(errors="replace").strip()
        if "remote port forwarding failed" in said:
            return True
        raise StartError(f"Could not forward a port of this machine to {host} over SSH "
                         f"({said[-300:] or f'no answer within {WAIT:g} s'}): its sshd must "
                         f"allow TCP forwarding (AllowTcpForwarding).")
    return False

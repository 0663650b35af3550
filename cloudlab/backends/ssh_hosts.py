"""Reaching SSH hosts: one probe per host says what it offers, or in one sentence what is wrong.

Before the SSH backend starts anything, it asks every host, in one ssh call each, for its
Python, its cloudlab version, its cores and its memory. ssh runs with ``BatchMode=yes`` (keys
only, from the user's agent or key files: never a password prompt that would hang a
notebook) and ``StrictHostKeyChecking=yes`` (known_hosts is respected: an unknown or changed
host key is refused, not silently accepted). Each failure names the host and the fix.
"""

from __future__ import annotations

import concurrent.futures
import json
import re
import shlex
import subprocess
from dataclasses import dataclass

from ..errors import StartError

CONNECT_TIMEOUT = 5  # seconds ssh waits for a host to answer

#: Run by the host's Python: what the backend needs to know of it, as one JSON line.
PROBE = """
import json, os, sys
try:
    import cloudlab
    version = cloudlab.__version__
except ImportError:
    version = None
pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
print(json.dumps({"python": sys.executable, "python_version": sys.version.split()[0],
                  "cloudlab": version, "cores": os.cpu_count(), "memory_mb": pages / 2**20}))
"""


class HostError(StartError):
    """A host the SSH backend cannot use, and why."""


@dataclass(frozen=True)
class SshHost:
    """``[user@]address[:port]``."""

    address: str
    user: str | None = None
    port: int = 22

    @classmethod
    def parse(cls, spec: str) -> SshHost:
        match = re.fullmatch(r"(?:([^@\s]+)@)?([^@:\s]+)(?::(\d+))?", spec.strip())
        if not match:
            raise ValueError(f"A host is [user@]address[:port], like alice@lab-pc-3 or "
                             f"10.0.0.5:2222, not {spec!r}.")
        user, address, port = match.groups()
        return cls(address, user, int(port) if port else 22)

    @property
    def target(self) -> str:
        return f"{self.user}@{self.address}" if self.user else self.address

    def __str__(self) -> str:
        return self.target + (f":{self.port}" if self.port != 22 else "")


@dataclass(frozen=True)
class HostInfo:
    host: SshHost
    python: str
    python_version: str
    cloudlab: str
    cores: int
    memory_mb: float


def ssh_command(host: SshHost, remote: str, identity_file: str = "",
                known_hosts: str = "", host_keys: str = "yes") -> list[str]:
    """The ssh command line that runs shell command ``remote`` on ``host``; ``host_keys``
    is ssh's StrictHostKeyChecking ("accept-new" only for a machine just created for us)."""
    argv = ["ssh", "-o", "BatchMode=yes", "-o", f"StrictHostKeyChecking={host_keys}",
            "-o", f"ConnectTimeout={CONNECT_TIMEOUT}", "-p", str(host.port)]
    if identity_file:
        argv += ["-i", identity_file, "-o", "IdentitiesOnly=yes"]
    if known_hosts:
        argv += ["-o", f"UserKnownHostsFile={known_hosts}"]
    return [*argv, host.target, remote]


def probe(host: SshHost, python: str, expected_cloudlab: str, identity_file: str = "",
          known_hosts: str = "", timeout: float = 30) -> HostInfo:
    """What ``host`` offers; :class:`HostError` naming the host and the fix otherwise."""
    command = ssh_command(host, f"{shlex.quote(python)} -c {shlex.quote(PROBE)}",
                          identity_file, known_hosts)
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise HostError(f"Host {host} did not answer within {timeout:g} s: check that it is "
                        f"up and that sshd runs there.") from None
    if done.returncode == 255:
        raise HostError(_ssh_failure(host, done.stderr, known_hosts))
    # The shell's own complaint only: a traceback that mentions a missing file is not this.
    if done.returncode == 127 or f"{python}: No such file or directory" in done.stderr:
        raise HostError(f"Host {host} has no Python at {python}: install Python 3.11 there, or "
                        f"name the one it has with python = \"/path/to/python\" in the "
                        f"profile's [ssh] table.")
    try:
        facts = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        said = (done.stderr or done.stdout).strip()[-300:] or "no output"
        raise HostError(f"Host {host}: {python} did not run cloudlab's probe (exit status "
                        f"{done.returncode}: {said}).") from None
    if facts["cloudlab"] is None:
        raise HostError(f"Host {host} has Python {facts['python_version']} at {python} but not "
                        f"cloudlab: install it there (pip install cloudlab=={expected_cloudlab}).")
    if facts["cloudlab"] != expected_cloudlab:
        raise HostError(f"Host {host} has cloudlab {facts['cloudlab']} and this client "
                        f"{expected_cloudlab}: install the same version on both.")
    return HostInfo(host, facts["python"], facts["python_version"], facts["cloudlab"],
                    int(facts["cores"]), float(facts["memory_mb"]))


def _ssh_failure(host: SshHost, stderr: str, known_hosts: str) -> str:
    """One sentence for ssh's own failure (exit status 255)."""
    text = stderr.strip()
    where = known_hosts or "~/.ssh/known_hosts"
    if "Host key verification failed" in text or "REMOTE HOST IDENTIFICATION HAS CHANGED" in text:
        return (f"Host {host}: its host key is not the one {where} holds for it (or it holds "
                f"none): check the key, then connect once with ssh -p {host.port} "
                f"{host.target} to accept it.")
    if "Permission denied" in text:
        return (f"Host {host} refused every key offered: add your public key to "
                f"~/.ssh/authorized_keys of {host.user or 'your user'} there (ssh-copy-id -p "
                f"{host.port} {host.target}), or name the key with identity_file.")
    reasons = ("Connection timed out", "No route to host", "Connection refused",
               "Could not resolve hostname", "Network is unreachable", "timed out")
    reason = next((r for r in reasons if r in text), None)
    if reason:
        return (f"Host {host} cannot be reached over SSH ({reason.lower()}): check its "
                f"address and port, and that sshd runs there.")
    return f"Host {host}: ssh failed ({text.splitlines()[-1] if text else 'no message'})."


def probe_all(hosts: list[SshHost], python: str, expected_cloudlab: str,
              identity_file: str = "", known_hosts: str = "") -> list[HostInfo]:
    """Every host probed at once; the first failure (in host order) is raised."""
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(hosts), 16))) as pool:
        futures = [pool.submit(probe, h, python, expected_cloudlab, identity_file, known_hosts)
                   for h in hosts]
        return [f.result() for f in futures]

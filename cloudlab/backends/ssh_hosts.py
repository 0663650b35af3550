"""Reaching SSH hosts: the ssh command line, and ssh's own failures in one sentence each.

ssh runs with ``BatchMode=yes`` (keys only, from the user's agent or key files: never a
password prompt that would hang a notebook) and ``StrictHostKeyChecking=yes`` (known_hosts is
respected: an unknown or changed host key is refused, not silently accepted). Each failure
names the host and the fix. What a host offers is asked by :mod:`.environment`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import StartError

CONNECT_TIMEOUT = 5  # seconds ssh waits for a host to answer


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


def ssh_failure(host: SshHost, stderr: str, known_hosts: str) -> str:
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

"""MPI worlds across SSH hosts: ``--mpi`` on the ssh backend.

The engines start as the ranks of one Open MPI job whose ``mpirun`` runs on the client and
reaches the hosts with the cluster's own ssh settings (its ``plm_rsh_agent``); ranks go to
the hosts in turn, so neighbours in the ring are on different hosts. Each rank runs the
engine under cloudlab's agent with its host's Python (cloudlab's environment there, which
gets the client's mpi4py), and holds a lease on the client over a TCP connection (as Slurm
jobs do): it ends when the client dies or the link stays cut. The hosts need Open MPI, the
version the client's ``mpirun`` has; ``mpi_args`` adds mpirun options (which network to use,
say: ``["--mca", "btl_tcp_if_include", "10.0.0.0/24"]``).

Where the hosts cannot reach the client (cloud VMs), ``mpirun`` runs on a host instead (the
controller's VM), over one SSH session from the client that ends it when the client goes;
it reaches the other hosts with the cluster's own key, copied into the cluster's folder
there, and the ranks hold their lease on the client through SSH forwards.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from pathlib import Path

from ..errors import ConfigError
from .base import Command, Launched, check_mpi4py, read_tail
from .remote import mpirun_argv as remote_mpirun_argv
from .ssh_hosts import SshHost, ssh_command


class RemoteRank(Launched):
    """An engine that is one rank of an MPI job across the hosts: it lives and ends with
    the job's ``mpirun``, which runs here."""

    def __init__(self, name: str, host: SshHost, world: subprocess.Popen, log: Path):
        self.name, self.host, self.pid = name, host.address, None
        self.world, self.log = world, log

    def exit_code(self) -> int | None:
        return self.world.poll()

    def log_tail(self, lines: int = 20) -> str:
        return read_tail(self.log, lines)


def check(hosts: list[SshHost], mpirun_here: bool = True) -> None:
    """One sentence naming the fix where an MPI job cannot span ``hosts`` from here."""
    if mpirun_here and shutil.which("mpirun") is None:
        raise ConfigError("MPI engines on SSH hosts start through this machine's mpirun, which "
                          "is not installed: install Open MPI here, the version the hosts "
                          "have (Debian: apt-get install openmpi-bin libopenmpi-dev).")
    check_mpi4py("the hosts")
    if len({(h.user, h.port) for h in hosts}) > 1:
        raise ConfigError("An MPI job spans hosts that mpirun reaches alike: give every host "
                          "the same SSH user and port.")


def mpirun_argv(placed: list[tuple[SshHost, str]], commands: list[Command], cluster: str,
                lease: float, lease_from: str, identity_file: str, known_hosts: str,
                extra: tuple[str, ...], host_keys: str = "yes",
                as_root: bool | None = None) -> list[str]:
    """The mpirun command line: rank ``i`` is ``commands[i]`` on ``placed[i]`` (its host and
    the Python engines run there), one app context each. ``as_root``: whether mpirun runs as
    root (default: whether this process does)."""
    host = placed[0][0]
    # How mpirun reaches each host: the cluster's ssh, less the host and command it adds.
    agent = ssh_command(host, "", identity_file, known_hosts, host_keys)[:-2]
    if host.user:
        agent += ["-l", host.user]
    return remote_mpirun_argv(
        [(["--host", where.address], python, command)
         for (where, python), command in zip(placed, commands)],
        cluster, lease, lease_from,
        ["--oversubscribe", "--mca", "plm_rsh_agent", shlex.join(agent), *extra],
        os.geteuid() == 0 if as_root is None else as_root)


def from_a_host(argv: list[str]) -> str:
    """The shell command that runs ``argv`` (an mpirun) on a host for as long as the SSH
    session that started it reads input: when the client dies, its input closes and the
    job is ended."""
    # (A background job's input is /dev/null unless redirected: the session's goes by fd 3.)
    return (f"exec 3<&0; {shlex.join(argv)} </dev/null & world=$!; "
            f"(cat <&3 >/dev/null; kill $world) >/dev/null 2>&1 & wait $world")

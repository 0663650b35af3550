"""A Slurm test cluster: Debian's slurmctld on the client, one slurmd in each namespace host.

Built on :class:`hosts.HostNetwork` (the hosts' sshd is not needed, but harmless). Each
slurmd runs apart from the client's checkout, venv and Python, as a compute node would: jobs
see the home folders (as over NFS) and /tmp, and Debian's bare python3. Munge
signs the daemons' messages with the key Debian ships, slurmctld runs here on the bridge
address, and each host runs ``slurmd -N <host>`` inside its network namespace, so a job's
processes see that host's network and reach the client across the bridge, as jobs on a real
cluster's nodes do. Two partitions: ``debug`` (both nodes, shared by up to 8 jobs per core)
and ``exclusive`` (the first node, one job per core: a job asking for more cores than are
free there waits in the queue). ``SLURM_CONF`` points the client commands (sbatch, squeue,
scancel) at this cluster; the fixture sets it for the tests. Everything is stopped and
removed on exit (TESTING.md, "Slurm").
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from hosts import HIDDEN, HostNetwork, Started, apart

CPUS_PER_NODE = 2
PARTITIONS = ("debug", "exclusive")


def missing() -> str | None:
    """Why a Slurm test cluster cannot be built here (None: it can)."""
    for tool, package in (("slurmctld", "slurmctld"), ("slurmd", "slurmd"),
                          ("sbatch", "slurm-client"), ("munged", "munge"), ("munge", "munge")):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            return f"{tool} is missing (Debian package {package})"
    if not Path("/etc/munge/munge.key").exists():
        return "/etc/munge/munge.key is missing (Debian package munge)"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster(Started):
    """slurmctld + one slurmd per host of ``network``; a context manager."""

    def __init__(self, network: HostNetwork, folder: Path):
        self.network, self.folder = network, folder
        self.conf = folder / "slurm.conf"
        self.nodes = [h.name for h in network.hosts]
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self._started_munge = False

    def _start(self) -> None:
        self._start_munge()
        (self.folder / "ctld").mkdir(parents=True)
        for node in self.nodes:
            (self.folder / "spool" / node).mkdir(parents=True)
        d = self.folder
        lines = [
            "ClusterName=cloudlab",
            f"SlurmctldHost={socket.gethostname()}({self.network.client_address})",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/munge",
            f"StateSaveLocation={d / 'ctld'}", f"SlurmdSpoolDir={d / 'spool' / '%n'}",
            f"SlurmctldPidFile={d / 'slurmctld.pid'}", f"SlurmdPidFile={d / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={d / 'slurmctld.log'}", f"SlurmdLogFile={d / 'slurmd-%n.log'}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill", "ReturnToService=2", "MpiDefault=none",
            # A pending job's reason is set when a scheduler pass looks at it; a busy machine
            # may wait for the periodic pass, so make that pass frequent.
            "SchedulerParameters=bf_interval=1",
            "JobCompType=jobcomp/none", "JobAcctGatherType=jobacct_gather/none",
            # Finished jobs stay visible to squeue for a while (their end state is read there).
            "MinJobAge=600",
        ]
        for host in self.network.hosts:
            lines.append(f"NodeName={host.name} NodeAddr={host.address} "
                         f"CPUs={CPUS_PER_NODE} RealMemory=4000 State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP "
                     "OverSubscribe=FORCE:8")
        lines.append(f"PartitionName=exclusive Nodes={self.nodes[0]} MaxTime=INFINITE "
                     f"State=UP OverSubscribe=NO")
        self.conf.write_text("\n".join(lines) + "\n")
        self._run("slurmctld", "-i")
        for host in self.network.hosts:
            # A compute node shares the cluster's home folders with the login node (the
            # client) but not the client's checkout, venv or Python (pyenv's, in that home).
            self._run(*host.inside(*apart(f"exec slurmd -N {host.name}",
                                          (*HIDDEN, Path.home() / ".pyenv"))))
        self._wait_for_nodes()

    def _start_munge(self) -> None:
        if subprocess.run(["munge", "-n"], capture_output=True).returncode == 0:
            return  # a munged already answers (the machine's own, or another test's)
        Path("/run/munge").mkdir(exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"], check=True,
                       capture_output=True)
        self._started_munge = True

    def _wait_for_nodes(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = self.sinfo()
            if states and all(s == "idle" for s in states.values()):
                return
            if time.monotonic() > deadline:
                log = (self.folder / "slurmctld.log").read_text()[-800:]
                raise RuntimeError(f"Slurm nodes did not become idle: {states}; {log}")
            time.sleep(0.3)

    def sinfo(self) -> dict[str, str]:
        """Each node's state (idle, mixed, allocated, down...)."""
        done = subprocess.run(["sinfo", "-N", "-h", "-o", "%N %t"], capture_output=True,
                              text=True, env=self.env)
        return dict(line.split()[:2] for line in done.stdout.splitlines() if line.strip())

    def jobs(self) -> list[str]:
        """Jobs queued or running, as ``id state name``."""
        done = subprocess.run(["squeue", "-h", "-o", "%i %T %j"], capture_output=True,
                              text=True, env=self.env)
        return done.stdout.split("\n")[:-1]

    def _run(self, *command: str) -> None:
        done = subprocess.run(command, capture_output=True, text=True, env=self.env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")

    def close(self) -> None:
        subprocess.run(["scancel", "--full", "-u", "root"], capture_output=True, env=self.env)
        for pidfile in sorted(self.folder.glob("slurm*.pid")):
            try:
                os.kill(int(pidfile.read_text().split()[0]), 9)
            except (OSError, ValueError, IndexError):
                pass
        if self._started_munge:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)

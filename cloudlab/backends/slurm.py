"""Slurm backend: the controller here (a login node), each engine a Slurm batch job.

The controller (ipcontroller or the Dask scheduler) runs on the client, listening on the
address the compute nodes reach it at; traffic to and from the engines is authenticated and
encrypted, as for any remote engine. Every engine is one job::

    sbatch --job-name cloudlab-CLUSTER --partition P --time T --cpus-per-task C [--mem M]

whose script writes the files the engine reads (connection file, certificates) where they
are not already (a shared home directory) and starts the engine under cloudlab's agent.
Before the first engine, one small job probes a node's Python and, the first time, a second
installs the environment engines run in there (:mod:`.environment`: this client's cloudlab
and versions), under ``env_dir`` in the home directory the nodes share; what it needs is
staged in ``log_dir``. The nodes are taken to be alike.
With ``--mpi`` the engines are instead the ranks of one job (``--ntasks N --spread-job``)
whose ``mpirun`` starts them through Slurm on the job's nodes (Open MPI on the nodes), in
blocks: rank 0 and its neighbours fill the first node's share, and so on.
Scaling adds or cancels jobs; stopping cancels them (scancel). One ``squeue`` per second
tells the state of every job of the cluster: a pending job's queue reason is shown in the
widget and quoted if the start times out, and a job that ends on its own is classified from
its Slurm state (time limit reached, cancelled, node failure, out of memory).

Nothing outlives the client. Each engine holds a lease over a TCP connection it opens to
the client (:class:`.remote.LeaseServer`): when the client dies, or the link stays cut
longer than ``lease``, the engine ends itself. Jobs still in the queue are cancelled by a
small watcher process that outlives the client only to run ``scancel`` for it.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError, StartError
from ..onhost.agent import LAST_WORDS
from ..profiles import option
from .base import (
    Backend,
    Command,
    Launched,
    check_mpi4py,
    last_words_file,
    read_last_words,
    read_tail,
)
from .environment import EnvironmentOptions, check_options
from .environment import prepare as prepare_environment
from .local import LocalBackend, LocalOptions
from .remote import (
    LeaseServer,
    address_towards,
    agent_command,
    check_lease,
    files_archive,
    mpirun_argv,
    parent_folders,
    wait_for_files,
)
from .ssh_hosts import HostError

#: Seconds between looks at the queue.
POLL = 1.0
#: Seconds cloudlab's setup jobs (a node's probe, the first install) may wait in the queue.
QUEUE_WAIT = 300.0
#: Slurm job states in which the job's processes have not ended.
LIVE_STATES = {"PENDING", "CONFIGURING", "RUNNING", "SUSPENDED", "REQUEUED", "RESIZING",
               "SIGNALING", "STAGE_OUT", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD"}
#: What ended a job, by its Slurm state, to follow "engine 3 ...".
ENDED_BY = {
    "TIMEOUT": "reached its Slurm time limit of {time_limit} (job {job}); raise time_limit "
               "in the profile's [slurm] table",
    "DEADLINE": "reached its Slurm deadline (job {job})",
    "CANCELLED": "was cancelled in Slurm (job {job}: scancel by someone, or an administrator)",
    "NODE_FAIL": "lost its node {node} (Slurm: NODE_FAIL, job {job})",
    "PREEMPTED": "was preempted by Slurm (job {job})",
    "BOOT_FAIL": "never ran: its node {node} failed to boot (job {job})",
    "OUT_OF_MEMORY": "ran out of memory: it held more than its Slurm --mem of {memory} "
                     "(job {job})",
}

#: Job states by the reason Slurm gives while it ends a job (the state still COMPLETING).
ENDED_FOR = {"TimeLimit": "TIMEOUT", "NodeDown": "NODE_FAIL", "Prolog": "BOOT_FAIL"}


@dataclass(frozen=True)
class SlurmOptions(EnvironmentOptions):
    partition: str = option("", "Partition the jobs go to (default: the cluster's default).")
    time_limit: str = option("1:00:00", "Wall time of each engine's job, as sbatch --time "
                             "takes it (minutes, or [days-]hours:minutes:seconds).")
    cpus_per_engine: int = option(1, "Cores each engine's job asks for (--cpus-per-task).")
    memory_per_engine: str = option("", "Memory each engine's job asks for (--mem, e.g. "
                                    "\"4G\"; default: the partition's).")
    account: str = option("", "Account the jobs are charged to (default: yours).")
    sbatch_args: tuple[str, ...] = option((), "More sbatch options, e.g. "
                                          "[\"--qos=short\", \"--constraint=avx512\"].")
    client_address: str = option("", "Address the nodes reach this machine at (default: "
                                 "the one this machine uses towards slurmctld).")
    log_dir: str = option("~/.cloudlab/slurm", "Folder for the jobs' output, which the "
                          "nodes and this machine both see (a shared home directory).")
    lease: float = option(30.0, "Seconds an engine lives on without hearing from this "
                          "client (a cut link) before it ends itself.")
    mpi_args: tuple[str, ...] = option((), "More mpirun options for MPI engines (--mpi), "
                                       "e.g. the network: [\"--mca\", \"btl_tcp_if_include\", "
                                       "\"10.0.0.0/24\"].")


@dataclass
class JobState:
    state: str = "PENDING"
    reason: str = ""
    node: str = ""
    exit_code: int | None = None


class SlurmJob(Launched):
    """An engine's Slurm job; its state is what the backend last read from squeue."""

    def __init__(self, name: str, job_id: str, log: Path, backend: SlurmBackend):
        self.name, self.job_id, self.log, self.pid = name, job_id, log, None
        self._backend = backend
        self.state = JobState()

    @property  # (squeue's to say: read, never set)
    def host(self) -> str:  # type: ignore[override]
        return self.state.node or "(queued)"

    def exit_code(self) -> int | None:
        return None if self.state.state in LIVE_STATES else (self.state.exit_code or 0)

    def waiting(self) -> str | None:
        if self.state.state != "PENDING":
            return None
        # Slurm says "None" until its scheduler has looked at the job (read as "" here).
        reason = self.state.reason or "not yet looked at by the scheduler"
        return f"queued in Slurm (job {self.job_id}: {reason})"

    def last_words(self) -> str | None:
        said = read_last_words(self.log)  # the engine's own, where the log folder is shared
        if said:
            return said
        # Read now: the engine's death may be noticed (by its controller) before squeue's
        # next look, while Slurm already knows why it ended it.
        record = _job_record(self.job_id)
        state = record.get("JobState", self.state.state)
        reason = record.get("Reason", self.state.reason)
        template = ENDED_BY.get(state) or ENDED_BY.get(ENDED_FOR.get(reason, ""))
        options = self._backend.options
        return template and template.format(
            job=self.job_id, node=self.state.node or "?", time_limit=options.time_limit,
            memory=options.memory_per_engine or "the partition's default")

    def log_tail(self, lines: int = 20) -> str:
        return read_tail(self.log, lines)


class SlurmRank(Launched):
    """An engine that is one rank of the cluster's MPI job: it lives and ends with it."""

    def __init__(self, name: str, job: SlurmJob):
        self.name, self.job, self.pid = name, job, None

    @property  # (its job's)
    def host(self) -> str:  # type: ignore[override]
        return self.job.host

    def exit_code(self) -> int | None:
        return self.job.exit_code()

    def waiting(self) -> str | None:
        return self.job.waiting()

    def last_words(self) -> str | None:
        return self.job.last_words()

    def log_tail(self, lines: int = 20) -> str:
        return self.job.log_tail(lines)


class SlurmBackend(Backend):
    name = "slurm"
    Options = SlurmOptions

    def __init__(self, options: SlurmOptions, cluster_name: str):
        super().__init__(options, cluster_name)
        check_lease(options.lease)
        check_options(options)
        if not isinstance(options.cpus_per_engine, int) or options.cpus_per_engine < 1:
            raise ConfigError(f"cpus_per_engine must be a whole number from 1, not "
                              f"{options.cpus_per_engine!r}.")
        if not re.fullmatch(r"\d+|(\d+-)?\d+(:\d+){0,2}", options.time_limit.strip()):
            raise ConfigError(f"time_limit is minutes or [days-]hours:minutes:seconds, like "
                              f"\"1:30:00\", not {options.time_limit!r}.")
        self.job_name = f"cloudlab-{cluster_name}"
        self._address = options.client_address
        self._local: LocalBackend | None = None
        self._controller: Launched | None = None
        self._jobs: dict[str, SlurmJob] = {}
        self._lease: LeaseServer | None = None
        self._watcher: subprocess.Popen | None = None
        self._poller: threading.Thread | None = None
        self._closing = threading.Event()
        self._log_dir = Path(os.path.expanduser(options.log_dir))
        self._python: str | None = None  # the engines', on the nodes, once prepared
        self._mpi = False

    @property
    def controller_ip(self) -> str:
        if not self._address:
            host = _slurmctld_host()
            self._address = address_towards(
                host, 6817, f"slurmctld's host {host}",
                "give client_address in the profile's [slurm] table.")
        return self._address

    def max_engines(self, mb_per_engine: int) -> tuple[int, str]:
        return 1024, "1024 jobs per cluster"

    async def prepare(self, preload: tuple[str, ...]) -> None:
        await asyncio.to_thread(self._check_partition)
        if self._local is None:
            self._local = LocalBackend(LocalOptions(ip=self.controller_ip), self.cluster_name)
        self._local.workdir = self.workdir
        await self._local.prepare(preload)
        self._log_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self._python is None:
            options = self.options if not self._mpi else dataclasses.replace(
                self.options, host_packages=(*self.options.host_packages, "mpi4py"))
            info = await asyncio.to_thread(prepare_environment, "Slurm's nodes", options,
                                           self._run_job)
            self._python = info.python
        if self._lease is None:
            self._lease = LeaseServer(self.controller_ip, self.options.lease / 4)
        if self._watcher is None:
            self._watcher = subprocess.Popen(
                [sys.executable, "-m", "cloudlab.backends.slurm", str(os.getpid()),
                 self.job_name], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL, start_new_session=True)

    def _check_partition(self) -> None:
        """Slurm's client commands answer, and the partition exists: else one sentence."""
        if shutil.which("sbatch") is None:
            raise StartError("sbatch is not on this machine's PATH: the slurm backend runs "
                             "where Slurm's commands do (a login node), or install "
                             "slurm-client and set SLURM_CONF.")
        done = _slurm("sinfo", "-h", "-o", "%R")
        if done.returncode != 0:
            raise StartError(f"Slurm does not answer (sinfo: {done.stderr.strip()[-300:]}); "
                             f"check that slurmctld runs and SLURM_CONF names its "
                             f"configuration.")
        partitions = sorted(set(done.stdout.split()))
        wanted = self.options.partition
        if wanted and wanted not in partitions:
            raise ConfigError(f"Slurm has no partition {wanted!r}; its partitions are "
                              f"{', '.join(partitions)}: set partition in the profile's "
                              f"[slurm] table to one of them.")

    async def gpus(self) -> tuple[list, str]:
        # Not this client's GPUs: the nodes' are Slurm's to hand out (--gres), not built yet.
        return [], ("cloudlab does not ask Slurm for GPUs yet (sbatch_args = "
                    "[\"--gpus-per-task=1\"] in the profile's [slurm] table does, without "
                    "--gpus)")

    def check_mpi(self) -> None:
        check_mpi4py("Slurm's nodes")
        self._mpi = True

    async def launch_world(self, commands: list[Command]) -> list[Launched]:
        """The engines as the ranks of one job, over as many nodes as Slurm gives it."""
        for command in commands:
            await wait_for_files(command.files, self._controller)
        while self._lease is None:
            await asyncio.sleep(0.01)
        assert self._python is not None  # prepare sets it before the lease
        log = self._log_dir / f"{self.cluster_name}-mpi-world.log"
        mpirun = mpirun_argv([([], self._python, c) for c in commands], self.cluster_name,
                             self.options.lease, self._lease.address,
                             list(self.options.mpi_args), os.geteuid() == 0)
        files = sorted({f for c in commands for f in c.files})
        script = "\n".join([*self._files_lines(files), "exec " + shlex.join(mpirun)]) + "\n"
        argv = ["--ntasks", str(len(commands)), "--spread-job",
                "--cpus-per-task", str(self.options.cpus_per_engine)]
        job = await self._submit("mpi-world", f"the MPI job of {len(commands)} ranks", argv,
                                 script, log)
        return [SlurmRank(c.name, job) for c in commands]

    async def launch(self, command: Command, cleanup: tuple[Path, ...] = ()) -> Launched:
        if command.controller:
            if self._local is None:
                self._local = LocalBackend(LocalOptions(ip=self.controller_ip),
                                           self.cluster_name)
            self._local.workdir = self.workdir
            self._controller = await self._local.launch(command, cleanup)
            return self._controller
        await wait_for_files(command.files, self._controller)
        while self._lease is None:  # prepare runs while the controller starts
            await asyncio.sleep(0.01)
        log = self._log_dir / f"{self.cluster_name}-{command.name}.log"
        argv = ["--ntasks", "1", "--cpus-per-task", str(self.options.cpus_per_engine)]
        return await self._submit(command.name, f"{command.name}'s job", argv,
                                  self._script(command, log), log)

    async def _submit(self, name: str, what: str, sizes: list[str], script: str,
                      log: Path) -> SlurmJob:
        argv = ["sbatch", "--parsable", "--job-name", self.job_name, "--output", str(log),
                "--open-mode", "append", *sizes, "--time", self.options.time_limit,
                *self._where()]
        if self.options.memory_per_engine:
            argv += ["--mem", self.options.memory_per_engine]
        done = await asyncio.to_thread(_slurm, *argv, input=script)
        if done.returncode != 0:
            raise StartError(f"Slurm refused {what}: {done.stderr.strip()[-400:]}"
                             f" (sbatch {shlex.join(argv[1:])}).")
        job = SlurmJob(name, done.stdout.strip().split(";")[0], log, self)
        self._jobs[job.job_id] = job
        self._start_poller()
        return job

    def _script(self, command: Command, log: Path) -> str:
        """The job: write the engine's files where the node lacks them, start the engine."""
        lines = self._files_lines(command.files)
        assert self._python is not None and self._lease is not None  # prepared: see launch
        lines.append("exec " + agent_command(
            self._python, self.cluster_name, command, self.options.lease, self._lease.address,
            {LAST_WORDS: str(last_words_file(log))}))
        return "\n".join(lines) + "\n"

    @staticmethod
    def _files_lines(files) -> list[str]:
        """A job script's start: write ``files`` where the node lacks them (a home folder
        the nodes share has them already)."""
        lines = ["#!/bin/sh", "umask 077"]
        if files:
            archive = base64.b64encode(files_archive(files)).decode()
            folders = " ".join(map(shlex.quote, parent_folders(files)))
            lines += [f"mkdir -p {folders}",
                      "base64 -d <<'CLOUDLAB_FILES' | tar -x --skip-old-files -C / -f -",
                      *(archive[i:i + 76] for i in range(0, len(archive), 76)),
                      "CLOUDLAB_FILES"]
        return lines

    def _run_job(self, command: str, stdin: bytes | None,
                 timeout: float) -> subprocess.CompletedProcess:
        """``command`` as a job on one node, waited for (sbatch --wait): what it printed
        (bytes, as ssh gives them). Its input is staged in ``log_dir``, which the nodes see."""
        import tempfile

        with tempfile.TemporaryDirectory(prefix=f"{self.cluster_name}-setup-",
                                         dir=self._log_dir) as folder:
            out, err = Path(folder, "out"), Path(folder, "err")
            if stdin is not None:
                Path(folder, "in").write_bytes(stdin)
                command += f" < {shlex.quote(str(Path(folder, 'in')))}"
            argv = ["sbatch", "--wait", "--parsable", "--job-name", self.job_name,
                    "--output", str(out), "--error", str(err), "--ntasks", "1",
                    "--time", self.options.time_limit, *self._where()]
            done = _slurm(*argv, input=f"#!/bin/sh\n{command}\n", timeout=timeout + QUEUE_WAIT)
            if isinstance(done, _TimedOut):  # (no engine is queued yet: only this job)
                _slurm("scancel", "--name", self.job_name)
                raise HostError(f"cloudlab's setup job on Slurm's nodes did not finish within "
                                f"{timeout + QUEUE_WAIT:g} s (queued, or a slow node): it is "
                                f"cancelled; try again, or ask for another partition.")
            if not out.exists():
                said = done.stderr.strip()[-300:] or "no reason given"
                raise HostError(f"Slurm did not run cloudlab's setup job ({said}; sbatch "
                                f"{shlex.join(argv[1:])}).")
            return subprocess.CompletedProcess(argv, done.returncode, out.read_bytes(),
                                               err.read_bytes() if err.exists() else b"")

    def _where(self) -> list[str]:
        """The sbatch options every job of the cluster gets from the profile."""
        argv = []
        for flag, value in (("--partition", self.options.partition),
                            ("--account", self.options.account)):
            if value:
                argv += [flag, value]
        return argv + list(self.options.sbatch_args)

    def _start_poller(self) -> None:
        if self._poller is None:
            self._poller = threading.Thread(target=self._poll, name="cloudlab-squeue",
                                            daemon=True)
            self._poller.start()

    def _poll(self) -> None:
        while not self._closing.wait(POLL):
            self.refresh()

    def refresh(self) -> None:
        """Read every job's state from squeue (and, once a job has ended, its exit code)."""
        done = _slurm("squeue", "--states=all", "-h", "--name", self.job_name,
                      "-o", "%i|%T|%r|%N")
        if done.returncode != 0:
            return  # slurmctld busy or restarting: keep the states last read
        seen = set()
        for line in done.stdout.splitlines():
            job_id, state, reason, node = (line.split("|") + ["", "", ""])[:4]
            job = self._jobs.get(job_id.strip())
            if job is None:
                continue
            seen.add(job.job_id)
            ended = state not in LIVE_STATES and job.state.state in LIVE_STATES
            job.state = JobState(state, reason if reason != "None" else "", node,
                                 job.state.exit_code)
            if ended:
                job.state.exit_code = _exit_code(job.job_id)
        for job_id, job in self._jobs.items():
            if job_id not in seen and job.state.state in LIVE_STATES:
                job.state = JobState("COMPLETED", "", job.state.node, _exit_code(job_id))

    async def terminate(self, launched: list[Launched], grace: float = 1.0) -> None:
        ranks = {id(p.job): p.job for p in launched if isinstance(p, SlurmRank)}
        jobs = [p for p in launched if isinstance(p, SlurmJob)] + list(ranks.values())
        local = [p for p in launched if not isinstance(p, (SlurmJob, SlurmRank))]
        if jobs:
            ids = [j.job_id for j in jobs]
            if grace == 0:  # ended by force (it died, or went silent): SIGKILL, now, not after
                # KillWait's SIGTERM, which a stopped process would leave pending
                await asyncio.to_thread(_slurm, "scancel", "--signal=KILL", "--full", *ids)
            await asyncio.to_thread(_slurm, "scancel", *ids)
            deadline = time.monotonic() + max(grace, 10.0)
            while time.monotonic() < deadline:
                await asyncio.to_thread(self.refresh)
                if all(j.state.state not in LIVE_STATES for j in jobs):
                    break
                await asyncio.sleep(0.2)
            for job in jobs:
                self._jobs.pop(job.job_id, None)
                for path in (job.log, last_words_file(job.log)):
                    path.unlink(missing_ok=True)
        if local and self._local is not None:
            await self._local.terminate(local, grace)

    async def close(self) -> None:
        self._closing.set()
        if self._jobs:
            await self.terminate(list(self._jobs.values()), grace=0)
        if self._lease is not None:
            self._lease.close()
        if self._watcher is not None:
            self._watcher.kill()
            self._watcher.wait()


class _TimedOut(subprocess.CompletedProcess):
    """A Slurm command that did not answer in time."""


def _slurm(*argv: str, input: str | None = None, timeout: float = 30
           ) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(argv, capture_output=True, text=True, input=input,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return _TimedOut(argv, 1, "", str(e))
    except OSError as e:
        return subprocess.CompletedProcess(argv, 1, "", str(e))


def _job_record(job_id: str) -> dict[str, str]:
    """What ``scontrol show job`` says of a job (empty: Slurm has forgotten it)."""
    done = _slurm("scontrol", "-o", "show", "job", job_id)
    return dict(re.findall(r"(\w+)=(\S*)", done.stdout)) if done.returncode == 0 else {}


def _exit_code(job_id: str) -> int | None:
    """A finished job's exit status as Popen reports one (-N: killed by signal N)."""
    match = re.fullmatch(r"(\d+):(\d+)", _job_record(job_id).get("ExitCode", ""))
    if not match:
        return None
    status, signal = int(match[1]), int(match[2])
    return -signal if signal else status


def _slurmctld_host() -> str:
    done = _slurm("scontrol", "show", "config")
    match = re.search(r"^SlurmctldHost\[0\]\s*=\s*(\S+?)(?:\((\S+)\))?$", done.stdout, re.M)
    if not match:
        raise ConfigError("Cannot tell where slurmctld runs (scontrol show config: "
                          f"{(done.stderr or done.stdout).strip()[-200:]}); give "
                          "client_address in the profile's [slurm] table.")
    return match[2] or match[1]


def cancel_when_gone(owner_pid: int, job_name: str) -> None:
    """Wait for the client ``owner_pid`` to exit, then cancel its jobs still queued (running
    ones end themselves as their lease connection closes)."""
    from ..onhost.agent import Lease

    Lease(owner_pid).wait()
    _slurm("scancel", "--name", job_name, "--user", str(os.getuid()))


if __name__ == "__main__":
    cancel_when_gone(int(sys.argv[1]), sys.argv[2])

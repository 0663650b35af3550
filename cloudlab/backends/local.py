"""Local backend: engines are processes on this machine, bound to 127.0.0.1.

Each process is started as the leader of its own process group (so a terminal's
Ctrl-C meant for the notebook does not reach the engines, and terminating the
group also ends anything the engine itself spawned) under cloudlab's agent,
which kills the group when this Python process dies. By default processes are
forked from a fork server that has already imported the engine kind
(:mod:`cloudlab.onhost.forkserver`); ``fork_server = false`` starts each in a fresh
interpreter instead, slower but otherwise the same.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..container import share
from ..errors import ConfigError
from ..onhost.agent import LAST_WORDS
from ..profiles import option
from ..security import runtime_dir
from . import forking
from .base import (
    Backend,
    Command,
    Launched,
    last_words_file,
    read_last_words,
    read_tail,
)

#: Thread pools inside each engine: one each, so 16 engines on 2 cores do not fight.
SINGLE_THREADED = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}


#: Seconds a lease keeper takes to reap its killed engine and end as it did.
KEEPER_ENDS_WITHIN = 0.5

#: Share of the machine's memory that "auto" memory limits divide among the engines.
MEMORY_SHARE = 0.9


@dataclass(frozen=True)
class LocalOptions:
    ip: str = option("127.0.0.1", "Address the controller binds to; keep 127.0.0.1 unless "
                     "engines on other hosts must reach it.")
    python: str = option("", "Python executable for engines (default: the one running cloudlab).")
    memory_fraction: float = option(0.8, "Share of free memory engines may fill; bounds N.")
    fork_server: bool = option(True, "Fork engines from a process that has already imported "
                               "them (fast); false starts each in a fresh interpreter.")


class LocalProcess(Launched):
    """A process on this machine, leader of its own process group."""

    pid: int

    def __init__(self, name: str, pid: int, log: Path):
        self.name, self.host, self.pid, self.log = name, socket.gethostname(), pid, log
        self._ps: psutil.Process | None = None

    def usage(self) -> tuple[float | None, float | None]:
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.own_pid)
            with self._ps.oneshot():
                # cpu_percent compares with the previous call: the first one reads 0.
                return self._ps.cpu_percent(None), self._ps.memory_info().rss / 2**20
        except psutil.Error:
            return None, None

    def last_words(self) -> str | None:
        return read_last_words(self.log)

    def log_tail(self, lines: int = 20) -> str:
        return read_tail(self.log, lines)


class SpawnedProcess(LocalProcess):
    """Started in a fresh interpreter; our own child. Started under the agent (``kept``), it
    is the lease keeper of the process it forks, the engine
    (:func:`cloudlab.onhost.agent.keep_apart`)."""

    def __init__(self, name: str, popen: subprocess.Popen, log: Path, kept: bool = True):
        super().__init__(name, popen.pid, log)
        self.popen, self.kept = popen, kept
        self._kept_pid: int | None = None

    @property
    def own_pid(self) -> int:
        if self.kept and self._kept_pid is None:  # (until the keeper has forked it: its own)
            try:
                self._kept_pid = next((c.pid for c in psutil.Process(self.pid).children()),
                                      None)
            except psutil.Error:
                pass
        return self._kept_pid or self.pid

    def exit_code(self) -> int | None:
        return self.popen.poll()


class ForkedProcess(LocalProcess):
    """Forked by a fork server, which reaps it and tells us its exit code."""

    def __init__(self, name: str, pid: int, log: Path, server: forking.ForkServer):
        super().__init__(name, pid, log)
        self.server = server

    def exit_code(self) -> int | None:
        code = self.server.exit_codes.get(self.pid)
        if code is None and self.server.closed and not group_alive(self.pid):
            return -1  # the server died before it could tell us; the process is gone
        return code


class MpiRank(LocalProcess):
    """An engine that is one rank of an MPI job: it lives and ends with ``world`` (mpirun).
    Its own pid is found by its process title, once the rank has started."""

    def __init__(self, name: str, world: SpawnedProcess, title: str):
        super().__init__(name, world.pid, world.log)
        self.world, self.title, self._pid = world, title, None

    @property
    def pid(self) -> int:
        if self._pid is None:
            try:
                for child in psutil.Process(self.world.pid).children(recursive=True):
                    if " ".join(child.cmdline()).strip() == self.title:
                        self._pid = child.pid
            except psutil.Error:
                pass
        return self._pid or self.world.pid

    @pid.setter
    def pid(self, value: int) -> None:
        pass  # (LocalProcess sets it; a rank's is found above)

    def exit_code(self) -> int | None:
        return self.world.exit_code()


class LocalBackend(Backend):
    name = "local"
    Options = LocalOptions
    same_machine = True
    knows_engine_pids = True

    @property
    def controller_ip(self) -> str:
        return self.options.ip

    def max_engines(self, mb_per_engine: int) -> tuple[int, str]:
        here = share()  # (a container's free memory is what its limit leaves)
        free_mb = here.available / 2**20
        limit = int(free_mb * self.options.memory_fraction / mb_per_engine)
        return limit, (
            f"each engine needs about {mb_per_engine} MB and {here.whose} has "
            f"{free_mb / 1024:.1f} GB free"
        )

    def auto_memory_limit(self, engines: int) -> int | None:
        # As Dask's LocalCluster does: the memory shared equally, with room for the notebook
        # itself; the container's memory, where this runs in one (a hub's, Binder's).
        return int(share().memory * MEMORY_SHARE / max(engines, 1))

    @property
    def python(self) -> str:
        return self.options.python or sys.executable

    @property
    def forks(self) -> bool:
        """Whether processes come from a fork server (it needs Linux's pidfds)."""
        return self.options.fork_server and hasattr(os, "pidfd_open")

    async def prepare(self, preload: tuple[str, ...]) -> None:
        if self.forks:
            await self._fork_server(preload)

    async def _fork_server(self, preload: tuple[str, ...]) -> forking.ForkServer:
        tag = zlib.crc32(" ".join(preload).encode())
        log = runtime_dir() / f"forkserver-{os.getpid()}-{tag:08x}.log"
        return await forking.get(self.python, preload, base_environment(), log)

    async def launch(self, command: Command, cleanup: tuple[Path, ...] = ()) -> Launched:
        assert self.workdir is not None  # the cluster sets it when it starts
        log = self.workdir / f"{command.name}.log"
        title = process_title(self.cluster_name, command.name)
        env = {**base_environment(), "CLOUDLAB_CLUSTER": self.cluster_name,
               LAST_WORDS: str(last_words_file(log)), **command.env}
        server = None
        if self.forks and command.preload:
            server = forking.ready(self.python, command.preload)
            if server is None and not command.spawn_if_cold:
                server = await self._fork_server(command.preload)
        if server is not None:
            pid = await server.fork({
                "entry": command.entry, "args": list(command.args), "env": env,
                "cwd": os.getcwd(), "log": str(log), "cleanup": [str(p) for p in cleanup],
                "title": title})
            return ForkedProcess(command.name, pid, log, server)
        argv = [self.python, "-m", "cloudlab.onhost.agent", "--owner-pid", str(os.getpid()),
                "--title", title]
        for path in cleanup:
            argv += ["--cleanup", str(path)]
        argv += [command.entry, "--", *command.args]
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=os.getcwd(), start_new_session=True, close_fds=True,
            )
        return SpawnedProcess(command.name, popen, log)

    def check_mpi(self) -> None:
        if shutil.which("mpirun") is None:
            raise ConfigError("MPI engines need mpirun, which is not installed: install Open "
                              "MPI (Debian: apt-get install openmpi-bin libopenmpi-dev) and "
                              "mpi4py (pip install mpi4py).")
        if self.python == sys.executable and importlib.util.find_spec("mpi4py") is None:
            raise ConfigError("MPI engines need mpi4py, which this Python lacks: pip install "
                              "mpi4py (or cloudlab's mpi extra, pip install 'cloudlab[mpi]').")

    async def launch_world(self, commands: list[Command]) -> list[Launched]:
        """One ``mpirun`` whose ranks are ``commands``, in order (one app context each: each
        rank has its own arguments and environment); fresh interpreters, not forks."""
        self.check_mpi()
        assert self.workdir is not None  # the cluster sets it when it starts
        log = self.workdir / "mpi-world.log"
        argv = ["mpirun", "--oversubscribe", "--bind-to", "none"]
        if os.geteuid() == 0:
            argv.append("--allow-run-as-root")
        titles = []
        for rank, command in enumerate(commands):
            title = process_title(self.cluster_name, command.name)
            env = {"CLOUDLAB_CLUSTER": self.cluster_name,
                   LAST_WORDS: str(last_words_file(self.workdir / f"{command.name}.log")),
                   **command.env}
            argv += [":"] if rank else []  # the next app context
            argv += ["-n", "1", "env", *(f"{k}={v}" for k, v in env.items()), self.python,
                     "-m", "cloudlab.onhost.agent", "--owner-pid", str(os.getpid()), "--title",
                     title, command.entry, "--", *command.args]
            titles.append(title)
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=base_environment(), cwd=os.getcwd(), start_new_session=True,
                close_fds=True)
        world = SpawnedProcess("mpirun", popen, log, kept=False)
        return [MpiRank(c.name, world, t) for c, t in zip(commands, titles)]

    async def terminate(self, launched: list[Launched], grace: float = 1.0) -> None:
        # A rank ends with its world: mpirun's group holds them all.
        launched = list({id(w): w for w in (p.world if isinstance(p, MpiRank) else p
                                            for p in launched)}.values())
        procs = [p for p in launched if isinstance(p, LocalProcess)]
        signal_groups([p.pid for p in procs], signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace
        while any(p.alive() for p in procs) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        # An engine first, then its keeper, which reaps it: killed together, the engine
        # would be left to init, a zombie in the group for as long as init does not reap.
        kept = [p for p in procs if isinstance(p, SpawnedProcess) and p.kept and p.alive()]
        for p in kept:
            try:
                os.kill(p.own_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = asyncio.get_running_loop().time() + KEEPER_ENDS_WITHIN
        while any(p.alive() for p in kept) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
        signal_groups([p.pid for p in procs], signal.SIGKILL)  # also ends children left in the groups
        # Return only once each is reaped and every group is empty: "stopped" means no
        # process is left.
        deadline = asyncio.get_running_loop().time() + 5
        while (any(p.alive() or group_alive(p.pid) for p in procs)
               and asyncio.get_running_loop().time() < deadline):
            await asyncio.sleep(0.01)


def process_title(cluster: str, name: str) -> str:
    """What ``ps`` and ``top`` show for a process of a cluster; :func:`cluster_of` reads it."""
    return f"cloudlab: {cluster} {name}"


def cluster_of(pid: int) -> str | None:
    """The cluster process ``pid`` belongs to, from its title (None if not cloudlab's)."""
    try:
        words = " ".join(psutil.Process(pid).cmdline()).split()
    except psutil.Error:
        return None
    return words[1] if len(words) >= 3 and words[0] == "cloudlab:" else None


def base_environment() -> dict[str, str]:
    """The environment every local process starts with."""
    return {**os.environ, **SINGLE_THREADED, "PYTHONUNBUFFERED": "1",
            "PYTHONPATH": client_python_path(),
            "SPT_NOENV": "1"}  # setproctitle: keep /proc/PID/environ readable


def client_python_path() -> str:
    """The client's own import directories (notebook folder, script folder, project),
    so engines import the same local modules; the interpreter's directories are left
    to the engine's interpreter."""
    prefixes = {sys.prefix, sys.base_prefix, sys.exec_prefix}
    extra = [os.path.abspath(p or os.getcwd()) for p in sys.path
             if not any(os.path.abspath(p or ".").startswith(x) for x in prefixes)]
    inherited = os.environ.get("PYTHONPATH", "")
    return os.pathsep.join(dict.fromkeys([*extra, *filter(None, inherited.split(os.pathsep))]))


def group_alive(pgid: int) -> bool:
    """Whether any process is left in process group ``pgid``."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_groups(pgids: list[int], sig: int) -> None:
    """``sig`` to each process group, and to its leader itself: a fresh fork is in its
    group (its own) only once it has called setsid, which a signal can come before."""
    for pgid in pgids:
        for send in (os.killpg, os.kill):
            try:
                send(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass

"""Local backend: engines are processes on this machine, bound to 127.0.0.1.

Each process is started as the leader of its own process group (so a terminal's
Ctrl-C meant for the notebook does not reach the engines, and terminating the
group also ends anything the engine itself spawned) under cloudlab's agent,
which kills the group when this Python process dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import psutil

from ..profiles import option
from .base import Backend, Command, Launched

#: Thread pools inside each engine: one each, so 16 engines on 2 cores do not fight.
SINGLE_THREADED = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}


@dataclass(frozen=True)
class LocalOptions:
    ip: str = option("127.0.0.1", "Address the controller binds to; keep 127.0.0.1 unless "
                     "engines on other hosts must reach it.")
    python: str = option("", "Python executable for engines (default: the one running cloudlab).")
    memory_fraction: float = option(0.8, "Share of free memory engines may fill; bounds N.")


class LocalProcess(Launched):
    def __init__(self, name: str, popen: subprocess.Popen, log: Path):
        self.name, self.host, self.pid = name, "127.0.0.1", popen.pid
        self.popen, self.log = popen, log
        self._ps: psutil.Process | None = None

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def usage(self) -> tuple[float | None, float | None]:
        try:
            if self._ps is None:
                self._ps = psutil.Process(self.pid)
            with self._ps.oneshot():
                # cpu_percent compares with the previous call: the first one reads 0.
                return self._ps.cpu_percent(None), self._ps.memory_info().rss / 2**20
        except psutil.Error:
            return None, None

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.rstrip().splitlines()[-lines:])


class LocalBackend(Backend):
    name = "local"
    Options = LocalOptions

    @property
    def controller_ip(self) -> str:
        return self.options.ip

    def max_engines(self, mb_per_engine: int) -> tuple[int, str]:
        free_mb = psutil.virtual_memory().available / 2**20
        limit = int(free_mb * self.options.memory_fraction / mb_per_engine)
        return limit, (
            f"each engine needs about {mb_per_engine} MB and this machine has "
            f"{free_mb / 1024:.1f} GB free"
        )

    async def launch(self, command: Command, cleanup: tuple[Path, ...] = ()) -> Launched:
        log = self.workdir / f"{command.name}.log"
        argv = [self.options.python or sys.executable, "-m", "cloudlab._agent",
                "--owner-pid", str(os.getpid())]
        for path in cleanup:
            argv += ["--cleanup", str(path)]
        argv += [command.entry, "--", *command.args]
        env = {**os.environ, **SINGLE_THREADED, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": client_python_path(), "CLOUDLAB_CLUSTER": self.cluster_name,
               **command.env}
        with open(log, "ab") as out:
            popen = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=os.getcwd(), start_new_session=True, close_fds=True,
            )
        return LocalProcess(command.name, popen, log)

    async def terminate(self, launched: list[Launched], grace: float = 1.0) -> None:
        procs = [p for p in launched if isinstance(p, LocalProcess)]
        signal_groups([p.pid for p in procs], signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace
        while any(p.alive() for p in procs) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        signal_groups([p.pid for p in procs], signal.SIGKILL)  # also ends children left in the groups
        for p in procs:
            try:
                p.popen.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        # Return only once every group is empty: "stopped" means no process is left.
        deadline = asyncio.get_running_loop().time() + 2
        while any(group_alive(p.pid) for p in procs) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)


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
    for pgid in pgids:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

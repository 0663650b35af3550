"""Processes that are tasks of the client's own event loop, with a script of their faults.

The ``inprocess`` backend runs a command whose entry is a coroutine function
``entry(process, *args)`` (the ``inprocess`` engine kind's are) as a task on
cloudlab's loop; its :class:`InProcess` handle stands for the process. Nothing
is started outside the client, so a test of membership, replacement, retries,
GPU slots or an MPI world's rules runs in milliseconds, and its faults are
exact: a test kills, freezes or delays a process through its handle, or
scripts launches ahead through the backend's :class:`Script`.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigError, StartError
from ..gpus import Gpu
from ..profiles import option
from .base import Backend, Command, Launched


@dataclass(frozen=True)
class InProcessOptions:
    launch_delay: float = option(0.0, "Seconds each process takes to start (as a slow host "
                                      "would), before its entry runs.")
    pretend_gpus: int = option(0, "GPUs to pretend there are (engines get one each with "
                                  "--gpus).")
    max_engines: int = option(64, "Engines the backend holds at most.")


@dataclass
class Script:
    """Faults to come, by command name ("engine-3", "controller")."""

    #: Launches that fail at once, with this message.
    refuse: dict[str, str] = field(default_factory=dict)
    #: Processes that end during their start, with this exit code.
    exit_at_start: dict[str, int] = field(default_factory=dict)
    #: Seconds a process takes to start, where not the options' launch_delay.
    delay: dict[str, float] = field(default_factory=dict)


class InProcess(Launched):
    """A task standing for a process: it ends when its entry returns or it is killed."""

    def __init__(self, name: str, host: str):
        self.name, self.host, self.pid = name, host, None
        self.task: asyncio.Task | None = None
        self.code: int | None = None
        self.lines: list[str] = []
        #: Cleared while the process is frozen (as by SIGSTOP): its engine takes and answers
        #: no work.
        self.thawed = threading.Event()
        self.thawed.set()
        #: When it was frozen (time.monotonic()); its heartbeats stop then.
        self.frozen_since: float | None = None
        self.said: str | None = None

    def exit_code(self) -> int | None:
        return self.code

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.lines[-lines:])

    def last_words(self) -> str | None:
        return self.said

    def kill(self, code: int = -signal.SIGKILL, last_words: str | None = None) -> None:
        """End the process now, as a signal (negative) or an exit (code) would."""
        if self.code is None:
            self.code, self.said = code, last_words
            self.thawed.set()
            if self.task is not None:  # (from any thread: a test's, say)
                self.task.get_loop().call_soon_threadsafe(self.task.cancel)

    def freeze(self) -> None:
        self.frozen_since = time.monotonic()
        self.thawed.clear()

    def thaw(self) -> None:
        self.frozen_since = None
        self.thawed.set()

    def silent_for(self) -> float:
        """Seconds since its last heartbeat would have been (0 unless frozen)."""
        since = self.frozen_since
        return 0.0 if since is None else time.monotonic() - since


class InProcessBackend(Backend):
    name = "inprocess"
    Options = InProcessOptions
    knows_engine_pids = True

    def __init__(self, options: InProcessOptions, cluster_name: str):
        super().__init__(options, cluster_name)
        self.script = Script()
        self.launched: list[InProcess] = []

    @property
    def controller_ip(self) -> str:
        return "127.0.0.1"

    def max_engines(self, mb_per_engine: int) -> tuple[int, str]:
        return (self.options.max_engines,
                f"the inprocess backend's max_engines is {self.options.max_engines}")

    async def gpus(self) -> tuple[list, str]:
        found = [Gpu(i, "Pretend GPU", f"GPU-inprocess-{i}", 1024.0, host="inprocess")
                 for i in range(self.options.pretend_gpus)]
        return found, "the inprocess backend's pretend_gpus option is 0"

    def check_mpi(self) -> None:
        pass  # a world of tasks: its rules (whole, fixed size) are the cluster's to keep

    async def launch_world(self, commands: list[Command]) -> list[Launched]:
        world: list[Launched] = []
        try:
            for command in commands:
                world.append(await self.launch(command))
        except BaseException:
            await self.terminate(world, grace=0)
            raise
        return world

    async def launch(self, command: Command, cleanup: tuple[Path, ...] = ()) -> Launched:
        if command.name in self.script.refuse:
            raise StartError(f"{command.name} of cluster {self.cluster_name} could not be "
                             f"launched: {self.script.refuse[command.name]}")
        module, _, function = command.entry.partition(":")
        entry = getattr(importlib.import_module(module), function)
        if not inspect.iscoroutinefunction(entry):
            raise ConfigError(f"The inprocess backend runs only the inprocess engine kind "
                              f"({command.entry} is a process's entry): use engine = "
                              f"\"inprocess\", or another backend.")
        process = InProcess(command.name, command.host or "inprocess")
        process.task = asyncio.ensure_future(self._run(process, entry, command))
        self.launched.append(process)
        return process

    async def _run(self, process: InProcess, entry, command: Command) -> None:
        try:
            await asyncio.sleep(self.script.delay.get(command.name, self.options.launch_delay))
            if command.name in self.script.exit_at_start:
                process.lines.append(f"{command.name}: ended during its start (scripted)")
                process.code = self.script.exit_at_start[command.name]
                return
            await entry(process, *command.args)
            process.code = 0 if process.code is None else process.code
        except asyncio.CancelledError:
            if process.code is None:
                process.code = -signal.SIGTERM
        except Exception as error:
            process.lines.append(f"{type(error).__name__}: {error}")
            process.code = 1

    async def terminate(self, launched: list[Launched], grace: float = 1.0) -> None:
        tasks = []
        for process in launched:
            assert isinstance(process, InProcess)
            # A stopped process leaves SIGTERM pending: the SIGKILL after the grace ends it.
            process.kill(-signal.SIGKILL if process.frozen_since is not None else -signal.SIGTERM)
            if process.task is not None:
                tasks.append(process.task)
        if tasks:
            await asyncio.wait(tasks)

    async def close(self) -> None:
        await self.terminate([p for p in self.launched if p.alive()], grace=0)

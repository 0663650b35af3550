"""The backend contract: start a command on a host, watch it, terminate it.

A backend knows nothing about ipyparallel or Dask. It is given :class:`Command`
objects (an entry point plus arguments, built by an engine) and returns
:class:`Launched` handles. All methods are async; the cluster awaits them on
cloudlab's loop. A few class methods serve the ``cloudlab`` command without a
cluster (``doctor``, ``gc``): a backend from another package, registered under
the ``cloudlab.backends`` entry point, gets those commands with no change here.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Hashable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError


@dataclass(frozen=True)
class AwsScope:
    """AWS services the engines may use by their machines' role, not by any credential of
    the client's: SQS queues and DynamoDB tables whose names start with ``prefix``."""

    region: str
    endpoint: str | None  # an AWS-compatible endpoint instead of AWS's own
    prefix: str


@dataclass(frozen=True)
class ServicePlace:
    """Where a service this client starts for its engines (a work queue, a results table)
    can live so that every engine reaches it."""

    #: An address of this machine that every engine reaches (None: engines cannot reach the
    #: client, e.g. VMs behind their controller).
    address: str | None
    aws: AwsScope | None = None
    #: Where engines cannot reach this machine: ``tunnel(port)``, a context manager yielding
    #: the port at which 127.0.0.1 on every engine's machine reaches 127.0.0.1:``port`` here.
    tunnel: Callable[[int], AbstractContextManager[int]] | None = None


@dataclass(frozen=True)
class Command:
    """What to run: ``entry`` (``module:function``) under cloudlab's agent, with ``args``."""

    name: str  # "controller", "engine-3": used for logs and error messages
    entry: str
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    #: Modules ``entry`` imports, which a backend may import once for many processes.
    preload: tuple[str, ...] = ()
    #: One process (a controller): start it fresh rather than wait for a fork server that is
    #: still importing, so that both happen at once.
    spawn_if_cold: bool = False
    #: Files of the client's that the command reads (connection files, certificates), some
    #: written by the controller while it starts: a backend on other machines waits for
    #: them and copies them to the same paths there.
    files: tuple[Path, ...] = ()
    #: The cluster's controller (ipcontroller, Dask scheduler), rather than an engine.
    controller: bool = False
    #: Files the command writes that the client and the engines read (a controller's
    #: connection files): a backend that runs it on another machine brings them back.
    writes: tuple[Path, ...] = ()
    #: The host it must run on, as the backend named it (the one holding the engine's GPU);
    #: "": the backend chooses.
    host: str = ""


def last_words_file(log: Path) -> Path:
    """Where the process logging to ``log`` writes why it ended itself."""
    return log.with_suffix(".last-words")


def read_tail(log: Path, lines: int) -> str:
    """The last ``lines`` lines of a process's log ("" while there is none)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def read_last_words(log: Path) -> str | None:
    """What the process logging to ``log`` said of its own end, if it did."""
    try:
        return last_words_file(log).read_text(errors="replace").strip() or None
    except OSError:
        return None


def _says(line: str) -> bool:
    return any(c.isalnum() for c in line)


def check_mpi4py(where: str) -> None:
    """MPI engines get this client's mpi4py: one sentence where it has none."""
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        raise ConfigError(f"MPI engines need mpi4py, and {where} get this client's version: "
                          f"pip install mpi4py here (or cloudlab's mpi extra).")


class Launched(abc.ABC):
    """A started process, as the cluster sees it."""

    name: str
    host: str
    pid: int | None

    @property
    def own_pid(self) -> int | None:
        """The process's own pid, as ``ps`` shows it (where a lease keeper leads its group,
        :func:`cloudlab.onhost.agent.keep_apart`, not the keeper's)."""
        return self.pid

    @abc.abstractmethod
    def exit_code(self) -> int | None:
        """None while running, else the exit status."""

    def alive(self) -> bool:
        return self.exit_code() is None

    @abc.abstractmethod
    def log_tail(self, lines: int = 20) -> str:
        """The last lines the process wrote, for error messages."""

    def last_line(self) -> str:
        """The last line the process wrote ("(no output)" if none), for one-line errors.
        Where it ended with a box between rules of dashes (mpirun's errors), the box's first
        line, which says what happened (the rest is advice)."""
        lines = [line.strip() for line in self.log_tail(40).splitlines()]
        rules = [i for i, line in enumerate(lines) if len(line) > 8 and set(line) <= set("-*=")]
        if len(rules) >= 2 and rules[-1] == max(i for i, line in enumerate(lines) if line):
            boxed = [line for line in lines[rules[-2] + 1:rules[-1]] if _says(line)]
            if boxed:
                return boxed[0]
        said = [line for line in lines if _says(line)]
        return (said or ["(no output)"])[-1]

    def waiting(self) -> str | None:
        """Why the process has not started yet, where it waits its turn (a batch queue's
        reason); None once it runs."""
        return None

    def last_words(self) -> str | None:
        """Why the process ended itself, if it said (the memory guard does)."""
        return None

    def usage(self) -> tuple[float | None, float | None]:
        """(CPU %, resident memory in MB) now, where the backend can see them."""
        return None, None


class Backend(abc.ABC):
    """Where engines run. Subclasses set ``name`` and an ``Options`` dataclass."""

    name: ClassVar[str]
    Options: ClassVar[type]
    #: Engines run on the client's machine and can map its memory (zero-copy push).
    same_machine: ClassVar[bool] = False
    #: A Launched's ``host`` and ``pid`` are the engine's own (no need to ask the engine).
    knows_engine_pids: ClassVar[bool] = False

    def __init__(self, options: Any, cluster_name: str):
        self.options = options
        self.cluster_name = cluster_name
        #: Where logs and connection files go; the cluster sets it when it starts.
        self.workdir: Path | None = None

    @property
    @abc.abstractmethod
    def controller_ip(self) -> str:
        """The address controllers bind to and engines connect to."""

    @abc.abstractmethod
    def max_engines(self, mb_per_engine: int) -> tuple[int, str]:
        """How many engines this backend can hold, and why no more."""

    async def gpus(self) -> tuple[list, str]:
        """The GPUs engines can be given (:class:`cloudlab.gpus.Gpu`, with the host each is
        in), and, where there are none, why (a clause). Called after :meth:`prepare`."""
        from ..gpus import detect

        return detect()

    def auto_memory_limit(self, engines: int) -> int | None:
        """Bytes one of ``engines`` engines may hold when the profile says "auto"
        (None: no limit where the backend cannot tell)."""
        return None

    async def provision(self, engines: int, timeout: float) -> None:
        """Create the machines ``engines`` engines need (cloud VMs) within ``timeout``
        seconds, before anything starts on them; the controller's address may depend on
        them."""

    async def reach(self, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """Where this client connects to reach the controller's ``addresses``: there
        directly, unless the backend tunnels (a controller behind SSH)."""
        return addresses

    def service_place(self) -> ServicePlace:
        """Where services for the engines can live: on this client, at the address the
        engines reach the controller on (this backend runs the controller here)."""
        return ServicePlace(self.controller_ip)

    def cost(self) -> Any:
        """What the machines cost (:class:`._vm.Cost`), where the backend pays for them."""
        return None

    async def prepare(self, preload: tuple[str, ...]) -> None:
        """Get ready to launch commands that import ``preload`` (e.g. start a fork server)."""

    @abc.abstractmethod
    async def launch(self, command: Command, cleanup: tuple[Path, ...] = ()) -> Launched:
        """Start ``command``; ``cleanup`` paths are removed if the owner dies."""

    def check_mpi(self) -> None:
        """Raise ConfigError, in one sentence, where engines cannot start as an MPI job."""
        raise ConfigError(f"MPI engines need a backend that starts them as one job, and the "
                          f"{self.name} backend starts each engine on its own: drop mpi, or "
                          f"use the local, ssh, slurm, ec2 or azure backend.")

    async def launch_world(self, commands: list[Command]) -> list[Launched]:
        """Start ``commands`` together as the ranks of one MPI job, in order."""
        self.check_mpi()
        raise NotImplementedError

    @abc.abstractmethod
    async def terminate(self, launched: list[Launched], grace: float = 1.0) -> None:
        """Stop these processes (and their children): politely, then by force."""

    async def close(self) -> None:
        """Release whatever the backend itself holds (hosts, VMs, connections)."""

    # ------------------------------------------- the `cloudlab` command's, without a cluster
    @classmethod
    def doctor(cls, options: Any, engines: int) -> list | None:
        """Whether a profile with these ``options`` can start ``engines`` engines, checked in
        seconds and creating nothing (`cloudlab doctor`): :class:`._doctor.Check` lines;
        None where the backend has nothing to check."""
        return None

    @classmethod
    def garbage_place(cls, options: Any) -> tuple[Hashable, str] | None:
        """Where clusters with these ``options`` may leave resources behind (`cloudlab gc`):
        a key, so that a place several profiles share is cleaned once, and the place in
        words; None where they leave nothing."""
        return None

    @classmethod
    def collect_garbage(cls, options: Any, live: set[str], dry_run: bool) -> list[str]:
        """Delete what clusters not in ``live`` (those running here) left at
        :meth:`garbage_place`, and whatever has expired; with ``dry_run`` delete nothing.
        A line for each thing."""
        return []

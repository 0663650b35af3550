"""The engine contract: what runs, how a client connects, how work reaches engines.

An engine builds the :class:`~cloudlab.backends.base.Command` for its controller
(ipcontroller / dask scheduler) and for each worker, connects the native client,
and implements a handful of primitives on which :class:`~cloudlab.Cluster`
builds everything else (map, push, pull, scatter, gather). Engine ids are small
integers on both engines, chosen by the cluster.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import json
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

from ..backends.base import Backend, Command
from ..onhost.calls import Result

#: (engine id, stream name, text) callback for output streamed from engines.
OutputSink = Callable[[int, str, str], None]


#: Each engine's answer to a call sent to several, by engine id (see Engine.run_each).
Answers = dict[int, "asyncio.Future[Result]"]

#: Where the client connects to reach the controller's (host, port) addresses.
Reach = Callable[[list[tuple[str, int]]], Awaitable[list[tuple[str, int]]]]


class Engine(abc.ABC):
    name: ClassVar[str]
    short_name: ClassVar[str]  # prefix of cluster names: ipp-1a2b3c
    #: Resident memory of one idle engine, measured; bounds how many fit on a host.
    mb_per_engine: ClassVar[int]
    #: What the controller and engines import: a fork server imports it once for all.
    preload: ClassVar[tuple[str, ...]]
    #: What the client imports to connect: ``prewarm`` imports it ahead of ``start``.
    client_modules: ClassVar[tuple[str, ...]]
    #: Seconds the controller may take to notice that an engine died.
    notices_death_within: ClassVar[float] = 5.0
    #: Engines import the client's own modules (they are threads of its process): the
    #: user's code is never sent to them.
    shares_client_modules: ClassVar[bool] = False

    def __init__(self, workdir: Path, ip: str, task_retries: int = 2, remote: bool = False,
                 heartbeat_timeout: float = 10.0):
        self.workdir = workdir
        self.ip = ip
        #: Engines on other machines than the client: traffic must be authenticated and
        #: encrypted on the wire, not only kept to this machine's users.
        self.remote = remote
        #: How often the engine's own scheduler reruns a task whose engine died (``submit``;
        #: ``map`` pieces are rerun by cloudlab's jobs, see :mod:`cloudlab.dispatch`).
        self.task_retries = task_retries
        #: Seconds an engine may stay silent before its controller stops counting it
        #: (:meth:`ready_ids`): a stopped process, a frozen VM, a cut link.
        self.heartbeat_timeout = heartbeat_timeout

    @classmethod
    def check_backend(cls, backend: Backend) -> None:
        """Raise ConfigError, in one sentence, where this kind cannot run on ``backend``."""

    @abc.abstractmethod
    def controller_command(self) -> Command:
        """The controller (ipcontroller, dask scheduler)."""

    @abc.abstractmethod
    def engine_command(self, engine_id: int) -> Command:
        """One engine with this id."""

    @abc.abstractmethod
    async def connect(self, controller_alive: Callable[[], bool], timeout: float,
                      reach: Reach | None = None) -> None:
        """Wait for the controller to be ready and connect the native client, to the
        addresses ``reach`` gives for the controller's (through tunnels, say)."""

    @property
    @abc.abstractmethod
    def client(self) -> Any:
        """The native client (ipyparallel ``Client`` / distributed ``Client``)."""

    @abc.abstractmethod
    async def ready_ids(self) -> set[int]:
        """Ids of engines registered and usable now: not those the controller has heard
        nothing from for ``heartbeat_timeout`` seconds."""

    @abc.abstractmethod
    async def busy_ids(self) -> set[int]:
        """Ids of engines running a task now."""

    @abc.abstractmethod
    async def submit(self, fn: Callable, *args: Any) -> Result:
        """Run ``call(fn, *args)`` on any engine; return its :class:`~cloudlab.onhost.calls.Result`."""

    def submit_now(self, fn: Callable, *args: Any) -> concurrent.futures.Future | None:
        """Like :meth:`submit`, sent from the caller's thread, or None where the engine's
        client cannot do that; a future of the Result. Saves two thread hops per task."""
        return None

    @abc.abstractmethod
    async def submit_to(self, engine_id: int, fn: Callable, *args: Any) -> Result:
        """Run ``call(fn, *args)`` on engine ``engine_id``; cancelling this withdraws the
        task where the engine's client can (a task already running goes on)."""

    async def gone(self, ids: list[int]) -> None:
        """Engines ``ids`` died: let the controller stop counting on them now, rather than
        when its own checks notice."""

    @abc.abstractmethod
    async def run_each(self, ids: list[int], fn: Callable, *args: Any) -> Answers:
        """Send ``call(fn, *args)`` to each engine in ``ids``; each one's answer to come.

        An answer waits for its engine whatever happens to it: the caller watches the
        engines meanwhile (:func:`cloudlab.dispatch.on_each`) and cancels the answers of
        those that died or stopped answering."""

    @abc.abstractmethod
    async def execute_each(self, code: str, ids: list[int], sink: OutputSink) -> Answers:
        """Send notebook ``code`` to each engine in ``ids``, its output streamed to ``sink``
        as it comes; each one's answer to come, a Result whose value is None or the cell's
        :class:`~cloudlab.onhost.calls.Failure` (see :meth:`run_each`)."""

    @abc.abstractmethod
    async def forget(self, ids: list[int]) -> None:
        """Engines ``ids`` are about to be stopped: let the controller know."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect the client (the processes are the backend's to stop)."""


async def wait_for_file(path: Path, alive: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll for the JSON file ``path`` until it is whole (controllers write theirs in
    pieces); fail fast if the process that should write it died."""
    await wait_until(lambda: whole_json(path), alive, timeout, what)


async def wait_until(ready: Callable[[], bool], alive: Callable[[], bool], timeout: float,
                     what: str, every: float = 0.02) -> None:
    """Poll ``ready()`` until it holds; StartError in one sentence if the ``what`` that should
    make it hold died, or after ``timeout`` seconds."""
    from ..errors import StartError

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not ready():
        if not alive():
            raise StartError(f"The {what} exited before it was ready")
        if loop.time() > deadline:
            raise StartError(f"The {what} was not ready after {timeout:g} s")
        await asyncio.sleep(every)


def whole_json(path: Path) -> bool:
    """Whether ``path`` holds a complete JSON document (not yet there, or half written: no)."""
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def raise_failures(results: Iterable[Result]) -> None:
    """Raise one collapsed RemoteError for the results that are failures, if any."""
    from ..errors import RemoteError
    from ..onhost.calls import Failure

    failures = {r.engine: r.value.as_tuple() for r in results if isinstance(r.value, Failure)}
    if failures:
        raise RemoteError(failures)


def settle(results: Iterable[Result], sink: OutputSink) -> None:
    """Hand what the engines printed to ``sink``, by engine, then raise their failures,
    collapsed (:func:`raise_failures`)."""
    results = list(results)
    for r in sorted(results, key=lambda r: r.engine):
        if r.stdout:
            sink(r.engine, "stdout", r.stdout)
        if r.stderr:
            sink(r.engine, "stderr", r.stderr)
    raise_failures(results)

"""Cluster: one engine kind on one backend, with a lifecycle and a small data API.

States (:class:`State`): ``new -> starting -> running -> stopping -> stopped``;
``failed`` if a start fails (everything it started is stopped first); ``dead``
if its controller ends while it runs (its engines are stopped). The logic is written
once as private coroutines on cloudlab's loop; each public method has a sync
form (``c.map``) and an async twin (``await c.amap``) that are one line each.

Functions sent by ``map``/``submit`` see names pushed to the engines, on both
engines: notebook globals they use travel with them, except pushed names,
which are looked up on the engine.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import importlib
import os
import re
import secrets
import shutil
import sys
import time
from collections import Counter
from enum import StrEnum
from pathlib import Path
from typing import Any

from . import _aio, gpus, policy, usercode
from . import progress as _progress
from .deaths import Death
from .dispatch import Job
from .engines.base import Engine
from .errors import ClusterStateError, ConfigError, StartError
from .membership import EngineStatus, Membership
from .namespaces import EngineNamespaces
from .plugins import backend_class, engine_class
from .profiles import Profile, load_profile, memory_limit_bytes
from .registry import Record, this_process_started
from .security import private_dir
from .supervisor import Supervisor
from .widgets import progress as _progress_views

_progress.set_view_factory(_progress_views.auto)  # views observe; the model only reports

#: Clusters of this process that may hold processes. A strong reference on
#: purpose: a running cluster stays reachable (for %cluster list and atexit)
#: even when the notebook drops its last name for it.
_live: set[Cluster] = set()

class State(StrEnum):
    """Where a cluster is in its life (equal to its name as a string: ``"running"``)."""

    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"  # its start failed; what it started is stopped
    DEAD = "dead"  # its controller ended while it ran; its engines are stopped


#: Cluster names appear in process titles and file names: keep them to one plain word.
VALID_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

#: Seconds processes get to exit on SIGTERM at stop before they are killed.
STOP_GRACE = 0.1


class Cluster(EngineNamespaces):
    """A set of parallel engines: ``Cluster(16, engine="dask")``, then ``start()`` or ``with``.

    ``n`` defaults to the profile's ``engines``; ``engine``, ``backend`` and any
    profile option given as a keyword override the profile (default ``local``).
    Invalid arguments raise :class:`~cloudlab.errors.ConfigError` here, before
    anything starts.
    """

    def __init__(self, n: int | str | None = None, *, engine: str | None = None,
                 backend: str | None = None, profile: str | None = None,
                 name: str | None = None, **options: Any):
        self.profile: Profile = load_profile(profile, engine=engine, backend=backend, **options)
        opts = self.profile.cluster
        self.engine_kind, self.backend_kind = opts.engine, opts.backend
        self._engine_cls = engine_class(self.engine_kind)
        if name is not None and not VALID_NAME.fullmatch(str(name)):
            raise ConfigError(f"A cluster name is letters, digits, '.', '_' and '-' (up to 64, "
                              f"like run-1), not {name!r}.")
        self.name = name or f"{self._engine_cls.short_name}-{secrets.token_hex(3)}"
        self._backend = backend_class(self.backend_kind)(self.profile.backend_options, self.name)
        self._engine_cls.check_backend(self._backend)
        if opts.mpi:
            self._backend.check_mpi()
        limit, reason = self._backend.max_engines(self._engine_cls.mb_per_engine)
        #: The GPUs of a GPU cluster, one per engine (empty: engines on CPU cores); on other
        #: machines, found there when the start has probed them.
        self.gpus: list[gpus.Gpu] = []
        #: --gpus and the engines asked for, until the GPUs are chosen.
        self._gpus_wanted = gpus.request(opts.gpus)
        self._gpus_asked = None if n is None else policy.engine_count(n, limit, reason)
        if self._gpus_wanted is not None and self._backend.same_machine:
            found, why_none = gpus.detect()
            self.gpus = gpus.choose(self._gpus_wanted, found, why_none, self._gpus_asked)
            n = len(self.gpus)
        if n is None:  # the profile's count; 0: one per core this machine gives us
            n = opts.engines or min(policy.usable_cores(), max(limit, 1))
        #: Engines wanted until the start hands the count to the membership.
        self._n = policy.engine_count(n, limit, reason)
        self.state = State.NEW
        self.started_at: float | None = None
        #: The engines, once the start has begun: their one owner.
        self._membership: Membership | None = None
        self._pushed = {}
        self._scattered = {}
        self._shared = {}
        #: Items of work (map items, submits) each engine has finished, by engine id.
        self.tasks_done: Counter[int] = Counter()
        self._workdir: Path | None = None
        #: The user's modules, sent to the engines when they change.
        self._code = usercode.EngineCode(self._install_code, lambda: self._members.usable())
        self._supervisor: Supervisor | None = None
        self._jobs: set[Job] = set()
        self._submits: dict[concurrent.futures.Future, str] = {}
        #: Why the cluster died (its controller ended), once it has.
        self.end_cause: str | None = None

    def __repr__(self) -> str:
        return (f"<Cluster {self.name}: {self.engine_kind} on {self.backend_kind}, "
                f"{len(self.engine_ids)} engines, {self.state}>")

    # ----------------------------------------------------------------- lifecycle
    def start(self, min_engines: int | None = None) -> Cluster:
        """Start the controller and ``n`` engines; return when all are usable.

        With ``min_engines``, return as soon as that many are: ``map`` and
        ``submit`` use them at once and the rest as they join, while ``run``,
        ``push`` and the other all-engine calls wait for every engine
        (:meth:`wait_for_engines` waits explicitly).
        """
        return _aio.run(self._start(min_engines))

    async def astart(self, min_engines: int | None = None) -> Cluster:
        return await _aio.wrap(self._start(min_engines))

    def wait_for_engines(self, n: int | None = None, timeout: float | None = None) -> None:
        """Wait until ``n`` engines (default: all) are usable; raise if some failed to start."""
        _aio.run(self._wait_for_engines(n, timeout))

    async def await_for_engines(self, n: int | None = None, timeout: float | None = None) -> None:
        await _aio.wrap(self._wait_for_engines(n, timeout))

    def stop(self) -> None:
        """Stop every process of this cluster; safe to call twice."""
        _aio.run(self._stop())

    async def astop(self) -> None:
        await _aio.wrap(self._stop())

    def scale(self, n: int) -> None:
        """Grow or shrink to ``n`` engines (the highest ids leave first)."""
        _aio.run(self._scale(n))

    async def ascale(self, n: int) -> None:
        await _aio.wrap(self._scale(n))

    def __enter__(self) -> Cluster:
        return self.start() if self.state == State.NEW else self

    def __exit__(self, *exc) -> None:
        self.stop()

    async def __aenter__(self) -> Cluster:
        return await self.astart() if self.state == State.NEW else self

    async def __aexit__(self, *exc) -> None:
        await self.astop()

    @property
    def client(self) -> Any:
        """The native client: ipyparallel ``Client`` or distributed ``Client``."""
        self._require_running()
        return self._engine.client

    @property
    def _members(self) -> Membership:
        """The engines' owner (callers make sure the start has begun)."""
        assert self._membership is not None, f"cluster {self.name} has not started"
        return self._membership

    @property
    def _engine(self) -> Engine:
        """The engine kind's client side, connected to this cluster's controller."""
        return self._members.engine

    @property
    def n(self) -> int:
        """How many engines the cluster wants (scale changes it)."""
        return self._n if self._membership is None else self._membership.wanted

    @property
    def engine_ids(self) -> list[int]:
        return [] if self._membership is None else sorted(self._membership.processes)

    async def _start(self, min_engines: int | None = None) -> Cluster:
        if min_engines is not None and not (isinstance(min_engines, int) and min_engines >= 1):
            raise ValueError(f"min_engines must be a whole number from 1 to {self.n}, "
                             f"not {min_engines!r}.")
        if self.state != State.NEW:
            raise ClusterStateError(
                f"Cluster {self.name} is {self.state}; create a new Cluster to start again.")
        self.state = State.STARTING
        _live.add(self)
        deadline = time.monotonic() + self.profile.cluster.start_timeout
        try:
            self._workdir = private_dir(f"{self.name}-")
            self._backend.workdir = self._workdir
            # Cloud VMs, before their addresses are used.
            await self._backend.provision(self._n, deadline - time.monotonic())
            engine = self._engine_cls(self._workdir, self._backend.controller_ip,
                                      self.profile.cluster.task_retries,
                                      remote=not self._backend.same_machine,
                                      heartbeat_timeout=self.profile.cluster.heartbeat_timeout)
            limit = memory_limit_bytes(self.profile.cluster.memory_limit)
            if isinstance(limit, str):  # "auto"
                limit = self._backend.auto_memory_limit(self._n)
            record = Record(self.name, self.engine_kind, self.backend_kind, os.getpid(),
                            this_process_started(), str(self._workdir))
            members = self._membership = Membership(
                self.name, self._backend, engine, self.profile.cluster, record, limit,
                self._welcome, self._why_stopped)
            record.save()
            members.gpus = self.gpus
            # The fork server imports the engine while the controller starts, and this
            # process what its client needs (a no-op after prewarm).
            preparing = asyncio.ensure_future(asyncio.gather(
                self._backend.prepare(engine.preload), _import_client(self._engine_cls)))
            preparing.add_done_callback(_aio.mark_seen)
            members.controller = await self._backend.launch(
                engine.controller_command(), cleanup=(self._workdir, record.path))
            members.save_record()
            # Engines start while the controller does (they wait for its connection file).
            connecting = asyncio.ensure_future(
                engine.connect(members.controller.alive, deadline - time.monotonic(),
                               self._backend.reach))
            try:
                await preparing
                if self._gpus_wanted is not None and not self.gpus:  # (where engines run)
                    found, why_none = await self._backend.gpus()
                    self.gpus = members.gpus = gpus.choose(self._gpus_wanted, found, why_none,
                                                           self._gpus_asked)
                    self._n = len(self.gpus)
                await members.start(self._n, min_engines, connecting, deadline)
            finally:
                if not connecting.done():
                    connecting.cancel()
        except BaseException as error:
            self.state = State.FAILED
            await self._teardown()
            if isinstance(error, StartError | ConfigError | asyncio.CancelledError |
                          KeyboardInterrupt):
                raise
            raise StartError(f"Cluster {self.name} failed to start ({type(error).__name__}: "
                             f"{error}); nothing is left running.") from error
        self.state = State.RUNNING
        self.started_at = time.time()
        self._supervisor = Supervisor(members, self._die)
        self._supervisor.start()
        return self

    async def _joined(self) -> None:
        """Let engines still joining finish (their failure is wait_for_engines' to report)."""
        await self._members.joined()

    async def _wait_for_engines(self, n: int | None, timeout: float | None) -> None:
        self._require_running()
        await self._members.wait_for(
            n, self.profile.cluster.start_timeout if timeout is None else timeout)

    async def _scale(self, n: int) -> None:
        self._require_running()
        await self._members.scale(n)

    async def _stop(self) -> None:
        if self.state in (State.NEW, State.STOPPED, State.FAILED):
            return
        if self.state == State.DEAD:  # already torn down (or being torn down) when it died
            await self._teardown()
            return
        self.state = State.STOPPING
        await self._teardown()
        self.state = State.STOPPED

    async def _teardown(self) -> None:
        """Stop everything this cluster started, whatever state it reached."""
        if self._supervisor is not None:
            await self._supervisor.stop()
        if self._membership is not None:
            # By force after a short grace: nothing they hold outlives the cluster (its
            # workdir goes next).
            await self._membership.stop(grace=STOP_GRACE)
        if self._backend.workdir is not None:
            await self._backend.close()
        self._end_submits()
        self._release_namespaces()
        if self._membership is not None:
            self._membership.record.remove()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
        _live.discard(self)

    async def _die(self, cause: str) -> None:
        """The controller ended: stop the engines, remove the files, say why from now on."""
        if self.state != State.RUNNING:
            return
        self.end_cause = cause
        self.state = State.DEAD
        await self._teardown()

    def _cut_short_by(self) -> str:
        """Why a call did not finish, said once the cluster has stopped or died under it."""
        return (f"cluster {self.name} ended ({self.end_cause})" if self.end_cause
                else f"cluster {self.name} was stopped")

    def why_not_running(self) -> str:
        if self.state == State.DEAD:
            return (f"Cluster {self.name} is dead: {self.end_cause} (stopped from outside, or "
                    f"crashed), and its engines were stopped; start a new one with "
                    f"%cluster start N.")
        return (f"Cluster {self.name} is {self.state}: start it first (c.start() or "
                f"%cluster start)." if self.state == State.NEW else
                f"Cluster {self.name} is {self.state}: start a new one with %cluster start N.")

    def why_start_interrupted(self) -> str:
        """One sentence for a start stopped by Ctrl-C: whether its cleanup has finished."""
        if self.state == State.FAILED:
            return (f"{self.name}: start interrupted; everything it had started or created "
                    f"is stopped and deleted.")
        return (f"{self.name}: start interrupted while it still cleans up; run cloudlab gc "
                f"to delete anything it created in a cloud.")

    def _why_stopped(self) -> str | None:
        """Why the cluster takes no work now; None while it runs."""
        return None if self.state == State.RUNNING else self.why_not_running()

    def _require_running(self) -> None:
        controller = self._membership.controller if self._membership is not None else None
        if self.state == State.RUNNING and controller is not None and not controller.alive():
            # Ended from outside (`cloudlab stop --all`, a killed controller), not yet noticed.
            assert self._supervisor is not None  # (it runs while the cluster does)
            cause = f"its controller {self._supervisor.cause(controller)}"
            _aio.submit(self._die(cause))  # kill what is left and remove its files
            self.state, self.end_cause = State.DEAD, cause
        if self.state != State.RUNNING:
            raise ClusterStateError(self.why_not_running())

    def death_of(self, eid: int) -> Death | None:
        """How engine ``eid`` died (or was ended by a cancel), if it did."""
        return None if self._membership is None else self._membership.deaths.get(eid)

    @property
    def deaths(self) -> list[Death]:
        """Engines that died (or were ended by a cancel) while the cluster ran, oldest first."""
        if self._membership is None:
            return []
        return sorted(self._membership.deaths.values(), key=lambda d: d.at)

    def service_place(self):
        """Where a service for the engines (a work queue) can live so that every engine
        reaches it (:class:`~cloudlab.backends.base.ServicePlace`)."""
        return self._backend.service_place()

    # ------------------------------------------------------------------ status
    def cost(self):
        """What this cluster's cloud VMs cost: ``instances`` running, ``dollars_per_hour``
        for them and ``dollars_so_far`` since each started (the dollars are None where the
        price is unknown); None for a cluster that has no VMs of its own."""
        return self._backend.cost()

    def status(self) -> list[EngineStatus]:
        """Each engine: id, host, pid, state (:class:`~cloudlab.membership.EngineState`)."""
        return _aio.run(self._status())

    async def astatus(self) -> list[EngineStatus]:
        return await _aio.wrap(self._status())

    async def _status(self) -> list[EngineStatus]:
        self._require_running()
        return await self._members.status(self.tasks_done)


def prewarm(engine: str | None = None, profile: str | None = None) -> concurrent.futures.Future:
    """Make the next start of ``engine`` clusters fast, in the background.

    The local backend starts its fork server, which imports the engine once
    (about a second), so ``start`` then only forks. ``%load_ext cloudlab``
    calls this for the default profile. Returns a future; a failure here
    surfaces again, with its reason, at ``start``.
    """
    chosen = load_profile(profile, engine=engine)
    kind = engine_class(chosen.cluster.engine)
    backend = backend_class(chosen.cluster.backend)(chosen.backend_options, "prewarm")

    async def warm() -> None:
        await asyncio.gather(backend.prepare(kind.preload), _import_client(kind))

    return _aio.submit(warm())


async def _import_client(kind) -> None:
    if not all(m in sys.modules for m in kind.client_modules):
        await _aio.to_thread(lambda: [importlib.import_module(m) for m in kind.client_modules])


def running_clusters() -> list[Cluster]:
    """Clusters started by this process and not yet stopped, oldest first."""
    return sorted((c for c in _live if c.state in (State.STARTING, State.RUNNING)),
                  key=lambda c: c.started_at or 0)


@atexit.register
def _stop_all_at_exit() -> None:
    for cluster in list(_live):
        try:
            cluster.stop()
        except Exception:
            pass

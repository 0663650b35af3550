"""The engines of one cluster, and how many it wants: one owner for both.

:class:`Membership` alone holds the engines: each one's process, whether the
controller counts it as usable, where it runs, its GPU, and the cluster's
record on disk (with the controller's process). Its verbs (:meth:`add`,
:meth:`mark_ready`, :meth:`remove`) are the only ways these change.

What is wanted is kept apart from what runs. The start, ``scale``, a death
that is not replaced and a start that ends with fewer engines each only set
:attr:`~Membership.wanted`; one locked step, :meth:`~Membership.reconcile`,
launches or removes engines until the running ones match (as distributed's
``SpecCluster._correct_state`` does), keeping these rules:

- the engines a start must wait for start alone, a core each, the rest joining
  in the background;
- an MPI world starts whole, and its size never changes;
- a GPU cluster runs one engine per GPU, on the GPU's host; a dead engine's GPU
  goes to its replacement;
- of engines that fail to start together, none stays.

Jobs (:mod:`cloudlab.dispatch`) and the supervisor (:mod:`cloudlab.supervisor`)
see it through the narrow protocols they declare.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from . import _aio, gpus, policy
from .backends.base import Backend, Command, Launched
from .deaths import Death
from .dispatch import on_each
from .engines.base import Engine
from .errors import ConfigError, EngineLost, ProvisionTimeout, StartError
from .onhost import calls
from .onhost.agent import MEMORY_LIMIT
from .output import PrefixedSink
from .profiles import ClusterOptions
from .registry import Record


class EngineState(StrEnum):
    """An engine as ``c.status()`` sees it (equal to its name as a string: ``"idle"``)."""

    QUEUED = "queued"  # its launch waits its turn (a batch queue)
    STARTING = "starting"
    IDLE = "idle"
    BUSY = "busy"
    DEAD = "dead"  # ended, and not yet removed by the supervisor


@dataclass(frozen=True)
class EngineStatus:
    """One engine as ``c.status()`` reports it."""

    id: int
    host: str
    pid: int | None
    state: EngineState
    cpu_percent: float | None = None
    memory_mb: float | None = None
    tasks_done: int = 0
    gpu: str | None = None  # "0: NVIDIA H100 80GB HBM3", the engine's GPU
    gpu_percent: float | None = None
    gpu_memory_mb: float | None = None
    #: Why a queued engine waits (a batch queue's reason).
    note: str | None = None


#: Seconds an engine may stay unregistered after its peers' last registration before it is
#: ended and started again (it is running: a queued one waits its turn).
STRAGGLER = 10.0
#: More deaths than this (or than twice the engines) within STORM_SECONDS and dead engines
#: are no longer replaced: something kills every engine, and replacing them would not end.
STORM_DEATHS, STORM_SECONDS = 20, 60


class Membership:
    """The engines of cluster ``name``: started by ``backend``, served by ``engine``.

    ``welcome(ids)`` gives engines that became usable what the others have (the user's
    modules, pushed names); ``why_not_running()`` says why the cluster takes no work now
    (None while it runs).
    """

    def __init__(self, name: str, backend: Backend, engine: Engine, options: ClusterOptions,
                 record: Record, memory_limit: int | None,
                 welcome: Callable[[list[int]], Awaitable[None]],
                 why_not_running: Callable[[], str | None]):
        self.name, self.backend, self.engine, self.options = name, backend, engine, options
        self.record = record
        #: Bytes each engine may hold before its memory guard ends it (None: no limit).
        self.memory_limit = memory_limit
        self._welcome = welcome
        self.why_not_running = why_not_running
        #: The GPUs engines run on, one each (empty: engines on CPU cores).
        self.gpus: list[gpus.Gpu] = []
        #: How many engines the cluster should have; :meth:`reconcile` makes it so.
        self.wanted = 0
        self.controller: Launched | None = None
        self.processes: dict[int, Launched] = {}
        #: Engines the controller has counted as usable (and that are still members).
        self.ready: set[int] = set()
        #: (host, pid) as the engine itself said, where the backend's handle cannot tell.
        self._identity: dict[int, tuple[str, int]] = {}
        self.gpu_of: dict[int, gpus.Gpu] = {}
        #: Every engine that ended without being asked to (or was ended by a cancel).
        self.deaths: dict[int, Death] = {}
        #: Why dead engines are no longer replaced (a storm of deaths, a failed start).
        self.not_replaced: str | None = None
        #: Notified whenever engines join, die or leave: jobs hand out work again.
        self.changed = _aio.Signal()
        #: Engines still joining after a start that returned early.
        self.joining: asyncio.Task | None = None
        #: Reconciles started in the background (replacing dead engines).
        self.replacing: set[asyncio.Task] = set()
        self._ids = itertools.count()
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------- verbs
    def add(self, eid: int, process: Launched) -> None:
        """Engine ``eid`` was launched (it is usable once :meth:`mark_ready`)."""
        self.processes[eid] = process

    async def mark_ready(self, ids: list[int]) -> None:
        """The controller counts engines ``ids``: they get what the others have, then work."""
        fresh = sorted(set(ids) - self.ready)
        if fresh:
            await self._welcome(fresh)
            self.ready.update(fresh)
            self.changed.notify()

    async def remove(self, ids: list[int], deaths: dict[int, Death] | None = None) -> None:
        """Engines ``ids`` leave the cluster: asked to (``deaths`` None: the controller is
        told first, and each stops politely), or because they died or were ended (each
        one's :class:`Death` kept; whatever it left in its process group ends at once)."""
        leaving = {eid: self.processes.pop(eid) for eid in ids if eid in self.processes}
        for eid in ids:
            self.ready.discard(eid)
            self._identity.pop(eid, None)
            self.gpu_of.pop(eid, None)  # (also of an engine whose launch failed)
        self.deaths.update({eid: d for eid, d in (deaths or {}).items() if eid in leaving})
        self.changed.notify()
        # A controller that has ended has nothing to be told (and its client may wait long
        # on it): the processes go all the same.
        told = self.controller is not None and self.controller.alive()
        if deaths is not None:
            await self.backend.terminate(list(leaving.values()), grace=0)
            if told:
                await self.engine.gone(list(leaving))
            self.save_record()
            return
        if told:
            await self.engine.forget([eid for eid, p in leaving.items() if p.alive()])
        await self.backend.terminate(list(leaving.values()))
        self.save_record()
        if told:
            await self._until_not_counted(set(leaving))

    async def _until_not_counted(self, ids: set[int]) -> None:
        """An engine can finish registering while it is being stopped: return once the
        controller has noticed that ``ids`` are gone (so no task is sent to them), or after
        the time it takes to notice."""
        deadline = time.monotonic() + self.engine.notices_death_within
        try:
            while ids & await asyncio.wait_for(self.engine.ready_ids(),
                                               deadline - time.monotonic()):
                if time.monotonic() > deadline:
                    return
                await asyncio.sleep(0.02)
        except TimeoutError:
            pass

    async def lost(self, deaths: dict[int, Death]) -> None:
        """Engines died (or were ended by a cancel): they leave, and are replaced unless
        a rule says otherwise, in which case the cluster wants fewer engines."""
        deaths = {eid: d for eid, d in deaths.items() if eid in self.processes}
        if not deaths:
            return  # already handled
        # The rule first, so that jobs woken by the removal hear why nothing replaces them.
        why_not = self._why_not_replace(deaths)
        if why_not is not None:
            self.wanted = len(self.processes) - len(deaths)
            self.not_replaced = why_not or self.not_replaced
        await self.remove(list(deaths), deaths)
        if why_not is None and self.why_not_running() is None:
            task = asyncio.ensure_future(self.reconcile())
            self.replacing.add(task)
            task.add_done_callback(self._replaced)

    def _why_not_replace(self, deaths: dict[int, Death]) -> str | None:
        """Why engines that died now are not replaced ("": by the profile's choice); None
        where they are."""
        recent = [d for d in [*self.deaths.values(), *deaths.values()]
                  if d.at > time.time() - STORM_SECONDS]
        if len(recent) > max(STORM_DEATHS, 2 * self.wanted):
            last = list(deaths.values())[-1]
            return (f"{len(recent)} engines died within {STORM_SECONDS} s, the last one "
                    f"{last.cause}; cloudlab stopped replacing them")
        if self.options.mpi:
            return ("a rank of an MPI job cannot be replaced (its COMM_WORLD has a fixed "
                    "size): stop the cluster and start a new one")
        if not self.options.replace_dead_engines:
            return ""
        return None

    def _replaced(self, task: asyncio.Task) -> None:
        self.replacing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.not_replaced = f"a replacement engine failed to start ({task.exception()})"
        self.changed.notify()

    # ------------------------------------------------------------ what is wanted
    async def start(self, n: int, enough: int | None, connecting: asyncio.Future,
                    deadline: float) -> None:
        """The first wave: ``n`` engines, returning once ``enough`` are usable (the rest
        join in the background) and the client, still ``connecting``, has connected."""
        self.wanted = n
        async with self._lock:
            await self._add(n, deadline, "nothing is left running", enough, connecting)

    async def scale(self, n: int) -> None:
        """Want ``n`` engines (the highest ids leave first) and make it so."""
        await self.joined()
        limit, reason = self.backend.max_engines(self.engine.mb_per_engine)
        n = policy.engine_count(n, limit + len(self.processes), reason)
        if self.options.mpi and n != len(self.processes):
            raise ConfigError(f"Cluster {self.name} is one MPI job of {len(self.processes)} "
                              f"ranks, whose size is fixed: stop it and start one of {n} "
                              f"engines.")
        if self.gpus and n > len(self.gpus):
            raise ConfigError(f"Cluster {self.name} runs one engine per GPU on "
                              f"{len(self.gpus)} GPUs: scale it to {len(self.gpus)} "
                              f"engines at most.")
        self.wanted = n
        await self.reconcile()

    async def reconcile(self) -> None:
        """Launch or remove engines until as many run as are wanted; where a launch fails,
        the cluster wants what it has (the error says so)."""
        await self.joined()
        async with self._lock:
            current = sorted(self.processes)
            if self.wanted > len(current):
                missing = self.wanted - len(current)
                await self._add(missing, time.monotonic() + self.options.start_timeout,
                                f"{self.name} keeps its other {len(current)} engines")
            elif self.wanted < len(current):
                await self.remove(current[self.wanted:])

    async def joined(self) -> None:
        """Let engines still joining finish (their failure is :meth:`wait_for`'s to report)."""
        if self.joining is not None:
            await asyncio.wait([self.joining])

    async def wait_for(self, n: int | None, timeout: float) -> None:
        """Until ``n`` engines (None: all of the start's) are usable; raise if they fail."""
        if n is None:
            if self.joining is not None:
                await asyncio.wait_for(asyncio.shield(self.joining), timeout)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(await self.engine.ready_ids() & set(self.processes)) < n:
            if loop.time() > deadline:
                raise ProvisionTimeout(len(await self.engine.ready_ids()), n, timeout,
                                       f"{self.name} keeps its engines")
            await asyncio.sleep(0.02)

    async def _add(self, count: int, deadline: float, outcome: str, enough: int | None = None,
                   connecting: asyncio.Future | None = None) -> None:
        """Launch ``count`` engines and wait for them (or for ``enough`` of them, the rest
        joining in the background); if any fails, none of them stays, and the error ends
        with ``outcome``: what is left."""
        new_ids = [next(self._ids) for _ in range(count)]
        enough = count if enough is None else min(enough, count)
        # Engines wanted first start alone (with as many more as there are cores to run
        # them): sixteen initialising together on two cores would each be usable only as
        # late as the last.
        head = max(enough, os.cpu_count() or 1)
        first = (new_ids[:head] if head < count and self.backend.same_machine
                 and not self.options.mpi else new_ids)  # an MPI world starts whole
        first_count = len(first)
        controller = self._controller()
        try:
            await self._launch(first)
            if connecting is not None:
                try:
                    await connecting
                except StartError as error:
                    if controller.alive():
                        raise
                    raise StartError(f"{error} (exit code {controller.exit_code()}, last "
                                     f"output: {controller.last_line()}); {outcome}."
                                     ) from None
            await self._wait_ready(first, deadline, outcome, enough)
            new_ids[:first_count] = first  # (stragglers' successors: see _wait_ready)
        except BaseException:
            await self.remove([*new_ids, *first])
            self.wanted = len(self.processes)
            raise
        if enough < count:
            self.joining = asyncio.create_task(
                self._join_rest(new_ids, new_ids[first_count:], deadline))
            self.joining.add_done_callback(lambda _: self.changed.notify())
            self.joining.add_done_callback(_aio.mark_seen)  # its error is wait_for's to raise
        else:
            await self._learn_identity(new_ids)

    async def _join_rest(self, ids: list[int], unlaunched: list[int], deadline: float) -> None:
        """Launch and wait for engines still to join; drop those that fail, keep the others."""
        try:
            await self._launch(unlaunched)
            await self._wait_ready(ids, deadline, f"{self.name} keeps the engines that started")
        except asyncio.CancelledError:
            raise
        except BaseException:
            ready = await self.engine.ready_ids()
            await self.remove([eid for eid in ids if eid not in ready])
            self.wanted = len(self.processes)
            await self._learn_identity([eid for eid in ids if eid in self.processes])
            raise
        await self._learn_identity(ids)

    async def _launch(self, ids: list[int]) -> None:
        """Launch engines ``ids`` together and add each process started, also when this is
        cancelled (a process asked for starts anyway), so that a teardown stops it."""
        if not ids:
            return
        if self.options.mpi:
            world = await self.backend.launch_world([self._command(eid) for eid in ids])
            for eid, process in zip(ids, world):
                self.add(eid, process)
            self.save_record()
            return
        launches = {eid: asyncio.ensure_future(self.backend.launch(self._command(eid)))
                    for eid in ids}
        all_done = asyncio.ensure_future(asyncio.wait(launches.values()))
        try:
            await asyncio.shield(all_done)
        finally:
            await all_done
            for eid, launch in launches.items():
                if launch.exception() is None:
                    self.add(eid, launch.result())
            self.save_record()
        for launch in launches.values():
            if (error := launch.exception()) is not None:
                raise error

    def _controller(self) -> Launched:
        assert self.controller is not None, "engines start once their controller has"
        return self.controller

    def _command(self, eid: int) -> Command:
        command = self.engine.engine_command(eid)
        env = dict(command.env)
        if self.memory_limit is not None:
            env[MEMORY_LIMIT] = f"{self.memory_limit / 1e6:.0f}"
        if self.gpus:
            gpu = self.gpu_of[eid] = self._free_gpu()  # given back when the engine leaves
            env["CUDA_VISIBLE_DEVICES"] = str(gpu.index)
            return dataclasses.replace(command, env=env, host=gpu.host)
        return dataclasses.replace(command, env=env)

    def _free_gpu(self) -> gpus.Gpu:
        """A GPU no engine holds (a dead engine's goes to its replacement)."""
        held = {g.key for g in self.gpu_of.values()}
        free = [g for g in self.gpus if g.key not in held]
        if not free:
            raise ConfigError(f"Cluster {self.name} runs one engine per GPU and all "
                              f"{len(self.gpus)} GPUs have one.")
        return free[0]

    async def _wait_ready(self, ids: list[int], deadline: float, outcome: str,
                          enough: int | None = None) -> None:
        """Until ``enough`` (default: all) of ``ids`` are usable, by ``deadline`` (monotonic).

        An engine still unregistered STRAGGLER seconds after its peers' last registration
        (and after it started running) is ended and launched again, under a new id that
        takes its place in ``ids``: a controller can lose a registration among a hundred
        (ipyparallel's hub, in 6 of 31 starts of 128 engines here), and the whole start would
        otherwise wait for start_timeout and fail."""
        wanted = set(ids)
        enough = len(wanted) if enough is None else enough
        deadline = max(deadline, time.monotonic() + 1.0)
        controller = self._controller()
        progress = (0, time.monotonic())  # (engines registered, when that count was reached)
        running_since: dict[int, float] = {}  # engine -> when it was first seen not queued
        while True:
            # An engine that died once usable is the supervisor's to report: stop waiting.
            wanted &= set(self.processes)
            ready = await self.engine.ready_ids() & wanted
            await self.mark_ready(sorted(ready))
            if len(ready) >= min(enough, len(wanted)):
                return
            now = time.monotonic()
            if len(ready) > progress[0]:
                progress = (len(ready), now)
            for eid in wanted - ready:
                if not self.processes[eid].waiting():
                    running_since.setdefault(eid, now)
            stragglers = sorted(eid for eid, since in running_since.items()
                                if eid in wanted - ready
                                and now - max(since, progress[1]) > STRAGGLER)
            if ready and stragglers and not self.options.mpi:
                successors = await self._relaunch(stragglers)
                for old, new in zip(stragglers, successors):
                    ids[ids.index(old)] = new
                wanted = (wanted - set(stragglers)) | set(successors)
                progress = (len(ready), now)
                continue
            dead = [eid for eid in sorted(wanted - ready) if not self.processes[eid].alive()]
            if dead or not controller.alive():
                proc = self.processes[dead[0]] if dead else controller
                raise StartError(
                    f"{proc.name} of cluster {self.name} exited during start (exit code "
                    f"{proc.exit_code()}, last output: {proc.last_line()}); {outcome}.")
            if time.monotonic() > deadline:
                queued = [why for eid in sorted(wanted - ready)
                          if (why := self.processes[eid].waiting())]
                hint = (f"{len(queued)} still wait: {'; '.join(queued[:3])}. Ask for fewer or "
                        f"smaller engines, or raise start_timeout in the profile."
                        if queued else "")
                raise ProvisionTimeout(len(ready), enough, self.options.start_timeout,
                                       outcome, hint)
            await asyncio.sleep(0.05)

    async def _relaunch(self, stragglers: list[int]) -> list[int]:
        """End engines that never registered and launch one each in their place (new ids)."""
        await self.remove(stragglers, {eid: Death(
            eid, f"had not registered {STRAGGLER:g} s after its peers; it was started again",
            ordered=True) for eid in stragglers})
        successors = [next(self._ids) for _ in stragglers]
        await self._launch(successors)
        return successors

    async def _learn_identity(self, ids: list[int]) -> None:
        """Ask engines their host and pid, where the backend's handles do not tell them."""
        ids = [eid for eid in ids if eid in self.processes]
        if ids and not self.backend.knows_engine_pids:
            try:
                results = await on_each(self, ids, "asking engines where they run",
                                        lambda: self.engine.run_each(ids, calls.identity),
                                        PrefixedSink())
                known = {eid: r.value for eid, r in results.items()}
            except EngineLost as lost:  # (an engine that died meanwhile is the supervisor's)
                known = lost.results
            self._identity.update(known)

    # ------------------------------------------------------------------- views
    async def status(self, tasks_done: Counter[int]) -> list[EngineStatus]:
        """Each engine as ``c.status()`` reports it, with ``tasks_done`` items each."""
        ready = await self.engine.ready_ids()
        busy = await self.engine.busy_ids()
        rows = []
        gpu_usage = gpus.usage([g.index for g in self.gpu_of.values() if not g.host])
        for eid, proc in sorted(self.processes.items()):
            host, pid = self.where(eid)
            waits = proc.waiting()
            if not proc.alive():
                state = EngineState.DEAD
            elif eid not in ready:
                state = EngineState.QUEUED if waits else EngineState.STARTING
            else:
                state = EngineState.BUSY if eid in busy else EngineState.IDLE
            cpu, memory = proc.usage() if state != EngineState.DEAD else (None, None)
            row = EngineStatus(eid, host, pid, state, cpu, memory, tasks_done[eid], note=waits)
            if eid in self.gpu_of:
                gpu = self.gpu_of[eid]
                used = None if gpu.host else gpu_usage.get(gpu.index)
                row = dataclasses.replace(
                    row, gpu=f"{gpu.index}: {gpu.name}", gpu_percent=used.percent if used else None,
                    gpu_memory_mb=used.memory_used_mb if used else None)
            rows.append(row)
        return rows

    def where(self, eid: int) -> tuple[str, int | None]:
        """Engine ``eid``'s host and pid: as the engine said, else as its launch knows."""
        process = self.processes[eid]
        return self._identity.get(eid, (process.host, process.own_pid))

    def usable(self) -> list[int]:
        """Engines that take work now: counted by the controller, process alive."""
        return sorted(eid for eid in self.ready
                      if eid in self.processes and self.processes[eid].alive())

    def state_of(self, eid: int) -> str | Death:
        """"alive"; "dying" (its process ended, the supervisor has yet to say why); or
        how it left the cluster."""
        if eid in self.processes:
            return "alive" if self.processes[eid].alive() else "dying"
        return self.deaths.get(eid) or Death(eid, "left the cluster", ordered=True)

    def coming(self) -> bool:
        """Whether engines that are not usable yet are starting (joining, replacements)."""
        return bool(set(self.processes) - self.ready or self.replacing
                    or (self.joining is not None and not self.joining.done()))

    def why_none(self, job: str) -> str:
        """Why ``job`` has no engine to run on, and the fix."""
        return (f"Cluster {self.name} has no engine left to run {job}"
                + (f": {self.not_replaced}" if self.not_replaced else "")
                + "; add engines with c.scale(n) (or %cluster scale N).")

    async def submit_to(self, eid: int, fn: Callable, *args: Any) -> calls.Result:
        return await self.engine.submit_to(eid, fn, *args)

    async def end(self, ids: list[int], why: str) -> None:
        """End engines ``ids`` at once (they run work that must stop); they are replaced
        like engines that died."""
        await self.lost({eid: Death(eid, f"was ended because {why}", ordered=True)
                         for eid in ids})

    # ------------------------------------------------------------------ record
    def save_record(self) -> None:
        if not self.record.path.exists():
            return  # stopped from outside (`cloudlab stop`): do not bring the record back
        processes = [*self.processes.values(), self.controller]
        self.record.engines = len(self.processes)
        self.record.pids = [p.pid for p in processes if p is not None and p.pid]
        self.record.save()

    async def stop(self, grace: float) -> None:
        """Disconnect the client, end every engine, then the controller: each politely, then
        by force after ``grace`` seconds. Engines first, while their controller is there to say goodbye
        to (a Dask worker whose scheduler is gone can hang in its goodbye)."""
        for task in [*self.replacing, self.joining]:
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
                await asyncio.wait([task])
        self.changed.notify()  # jobs waiting for engines see the cluster go
        try:
            await asyncio.wait_for(self.engine.close(), 5)
        except Exception:
            pass
        await self.backend.terminate(list(self.processes.values()), grace=grace)
        if self.controller is not None:  # it has no engine left to wait for
            await self.backend.terminate([self.controller], grace=grace / 2)
        self.processes.clear()
        self.ready.clear()
        self.controller = None

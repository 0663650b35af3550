"""Keeps a running cluster whole: a dead engine is replaced, a dead controller ends the cluster.

One task per running cluster looks at its processes every 50 ms (locally a
dictionary lookup per engine: the fork server reports each exit as it
happens) and, every second where engines are remote, at the engines its
controller still counts. For each engine that ended without being asked to,
it records a :class:`~cloudlab.deaths.Death` with its cause, tells the
controller, removes whatever the engine left in its process group, and starts
a replacement under a new id. Jobs (:mod:`cloudlab.dispatch`) hear of every
change through the cluster's ``engines_changed`` signal and run the dead
engine's pieces elsewhere.

When the controller ends, nothing can be saved: the engines are stopped, the
cluster's files removed, and the cluster is ``dead``, saying why, so that the
next start begins clean.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from . import _aio
from .deaths import Death, cause_of, oom_kills

if TYPE_CHECKING:
    from .backends.base import Launched
    from .cluster import Cluster

#: Seconds between looks at the processes.
PERIOD = 0.05
#: Seconds between asking the controller which engines it counts (remote engines).
ASK_CONTROLLER_EVERY = 1.0
#: More deaths than this (or than twice the engines) within STORM_SECONDS and dead engines
#: are no longer replaced: something kills every engine, and replacing them would not end.
STORM_DEATHS, STORM_SECONDS = 20, 60


class Supervisor:
    def __init__(self, cluster: Cluster):
        self.cluster = cluster
        #: Every engine that ended while the cluster ran, by engine id.
        self.deaths: dict[int, Death] = {}
        #: Replacements being started now.
        self.replacing: set[asyncio.Task] = set()
        self._oom = oom_kills()
        self._task: asyncio.Task | None = None
        #: Why dead engines are no longer replaced (a storm of deaths, a failed start).
        self.not_replaced: str | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())
        self._task.add_done_callback(_aio.mark_seen)

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self.replacing)
                 if t is not None and not t.done() and t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)

    async def _watch(self) -> None:
        cluster = self.cluster
        loop = asyncio.get_running_loop()
        asked = loop.time()
        while cluster.state == "running":
            await asyncio.sleep(PERIOD)
            controller = cluster._controller
            if controller is not None and not controller.alive():
                asyncio.ensure_future(cluster._die(f"its controller {self.cause(controller)}"))
                return
            # Engines not yet usable are their start's to watch (it fails, or drops them).
            dead = {eid: p for eid, p in cluster._processes.items()
                    if eid in cluster._ready and not p.alive()}
            if (not dead and not cluster._backend.knows_engine_pids
                    and loop.time() - asked > ASK_CONTROLLER_EVERY):
                asked = loop.time()
                counted = await cluster._engine.ready_ids()
                dead = {eid: cluster._processes[eid] for eid in cluster._ready - counted
                        if eid in cluster._processes}
            for eid, proc in dead.items():
                await self.engine_died(eid, proc, Death(eid, self.cause(proc)))

    def cause(self, proc: Launched) -> str:
        before, self._oom = self._oom, oom_kills()
        return cause_of(proc.exit_code(), proc.last_words(), before, self._oom)

    async def end(self, ids: list[int], why: str) -> None:
        """End engines ``ids`` now (they run work that must stop); they are replaced."""
        cluster = self.cluster
        doomed = {eid: cluster._processes[eid] for eid in ids if eid in cluster._processes}
        for eid, proc in doomed.items():
            await self.engine_died(eid, proc, Death(eid, f"was ended because {why}",
                                                    ordered=True))

    async def engine_died(self, eid: int, proc: Launched, death: Death) -> None:
        cluster = self.cluster
        if cluster._processes.get(eid) is not proc:
            return  # already handled
        del cluster._processes[eid]
        cluster._gpu_of.pop(eid, None)
        cluster._ready.discard(eid)
        cluster._identity.pop(eid, None)
        self.deaths[eid] = death
        cluster.engines_changed.notify()
        await cluster._backend.terminate([proc], grace=0)  # and whatever it left in its group
        await cluster._engine.gone([eid])
        cluster._save_record()
        recent = [d for d in self.deaths.values() if d.at > time.time() - STORM_SECONDS]
        if len(recent) > max(STORM_DEATHS, 2 * cluster.n):
            self.not_replaced = (f"{len(recent)} engines died within {STORM_SECONDS} s, the "
                                 f"last one {death.cause}; cloudlab stopped replacing them")
        elif cluster.profile.cluster.mpi:
            self.not_replaced = ("a rank of an MPI job cannot be replaced (its COMM_WORLD has "
                                 "a fixed size): stop the cluster and start a new one")
        elif cluster.profile.cluster.replace_dead_engines and cluster.state == "running":
            task = asyncio.ensure_future(self._replace())
            self.replacing.add(task)
            task.add_done_callback(self._replaced)

    async def _replace(self) -> None:
        cluster = self.cluster
        async with cluster._lock:
            if cluster.state != "running" or len(cluster._processes) >= cluster.n:
                return
            await cluster._add_engines(
                1, time.monotonic() + cluster.profile.cluster.start_timeout)

    def _replaced(self, task: asyncio.Task) -> None:
        self.replacing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.not_replaced = f"a replacement engine failed to start ({task.exception()})"
        self.cluster.engines_changed.notify()

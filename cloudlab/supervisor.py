"""Watches a running cluster's processes: a dead engine is reported, a dead controller ends it.

One task per running cluster looks at its processes every 50 ms (locally a
dictionary lookup per engine: the fork server reports each exit as it
happens) and, every second, at the engines its controller still counts: one
it has not heard from for ``heartbeat_timeout`` seconds, its process still
there (stopped, on a frozen VM, behind a cut link), is ended as if it had
died. Each engine that ended without being asked to is reported with its
cause (a :class:`~cloudlab.deaths.Death`) to the cluster's
:class:`~cloudlab.membership.Membership`, which removes it and replaces it
(or wants fewer engines, where a rule says so). Jobs
(:mod:`cloudlab.dispatch`) hear of every change and run the dead engine's
pieces elsewhere.

When the controller ends, nothing can be saved: the engines are stopped, the
cluster's files removed, and the cluster is ``dead``, saying why, so that the
next start begins clean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Protocol

from . import _aio
from .container import share
from .deaths import Death, cause_of, oom_kills

if TYPE_CHECKING:
    from .backends.base import Backend, Launched
    from .engines.base import Engine

#: Seconds between looks at the processes.
PERIOD = 0.05
#: Seconds between asking the controller which engines it counts.
ASK_CONTROLLER_EVERY = 1.0
#: Seconds within which a killed engine's process is reported ended.
ENDS_WITHIN = 0.3


class Watched(Protocol):
    """What the supervisor needs of the engines (:class:`cloudlab.membership.Membership`)."""

    backend: Backend
    engine: Engine
    controller: Launched | None
    processes: dict[int, Launched]
    ready: set[int]

    async def lost(self, deaths: dict[int, Death]) -> None: ...


class Supervisor:
    """Watches ``engines``; calls ``die(cause)`` when their controller ends."""

    def __init__(self, engines: Watched, die: Callable[[str], Awaitable[None]]):
        self.engines = engines
        self.die = die
        self._oom = oom_kills()
        self._task: asyncio.Task | None = None
        #: Deaths being handled (their processes ended, replacements started).
        self._losing: set[asyncio.Future] = set()

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._watch())
        self._task.add_done_callback(_aio.mark_seen)

    async def stop(self) -> None:
        task = self._task
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            await asyncio.wait([task])
        if self._losing:  # (not cancelled: the processes they took out must still end)
            await asyncio.wait(list(self._losing))

    async def _watch(self) -> None:
        engines = self.engines
        loop = asyncio.get_running_loop()
        asked = loop.time()
        while True:
            await asyncio.sleep(PERIOD)
            controller = engines.controller
            if controller is not None and not controller.alive():
                asyncio.ensure_future(self.die(f"its controller {self.cause(controller)}"))
                return
            # Engines not yet usable are their start's to watch (it fails, or drops them).
            dead = {eid: Death(eid, self.cause(p)) for eid, p in engines.processes.items()
                    if eid in engines.ready and not p.alive()}
            # (At least four asks within a heartbeat_timeout: a silent engine is ended soon
            # after it.)
            every = min(ASK_CONTROLLER_EVERY, engines.engine.heartbeat_timeout / 4)
            if not dead and loop.time() - asked > every:
                asked = loop.time()
                dead = await self._dropped()
            if dead:
                # In the background: ending a process on another host can take seconds (a
                # cut link), and other engines may die meanwhile. Membership takes them out
                # at once, so the next look does not find them again.
                losing = asyncio.ensure_future(engines.lost(dead))
                self._losing.add(losing)
                losing.add_done_callback(self._losing.discard)
                losing.add_done_callback(_aio.mark_seen)

    async def _dropped(self) -> dict[int, Death]:
        """Engines the controller no longer counts: dead, or silent for heartbeat_timeout
        while their process is still there (stopped, on a frozen VM, cut off), which
        removing them ends (SIGKILL ends a stopped process too)."""
        engines = self.engines
        counted = await engines.engine.ready_ids()
        dropped = {eid: engines.processes[eid] for eid in engines.ready - counted
                   if eid in engines.processes}
        if any(p.alive() for p in dropped.values()):
            # A controller can hear of a death (a closed connection) before its process is
            # reported ended: a killed engine must not be called silent.
            await asyncio.sleep(ENDS_WITHIN)
        # (Where its machine is known gone, a cloud's eviction say, that is why.)
        return {eid: Death(eid, self.cause(p) if not p.alive() else p.last_words() or
                           f"stopped answering for {engines.engine.heartbeat_timeout:g} s "
                           f"(SIGSTOP, a frozen VM or a cut link)")
                for eid, p in dropped.items()}

    def cause(self, proc: Launched) -> str:
        before, self._oom = self._oom, oom_kills()
        memory = share().memory_words if self.engines.backend.same_machine else None
        return cause_of(proc.exit_code(), proc.last_words(), before, self._oom, memory)

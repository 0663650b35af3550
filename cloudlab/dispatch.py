"""A job's pieces, handed to engines a few at a time, so cloudlab knows where each one runs.

``map`` cuts its items into chunks; a :class:`Job` gives each engine at most
``DEPTH`` of them at once (one running, one waiting there, so an engine never
idles for a round trip) and the next as each comes back. Knowing where every
piece is makes three things exact on both engine kinds, which their own
load balancers do differently or not at all:

- **An engine dies:** its pieces go back to the queue and run elsewhere, each
  up to ``retries`` times; a piece's first result is its result, so nothing is
  lost or counted twice. A piece that loses more engines than that fails the
  job with one line naming the piece and each engine's cause of death.
- **Cancel** (``Cluster.cancel``, Ctrl-C, the widget's Stop): nothing more is
  handed out, and the engines running pieces of the job are ended (and
  replaced), since neither engine kind can stop a task that has started.
- **Engines joining** (a start that returned early, a replacement) get work
  as soon as they are usable.

The engines' own machinery still carries every piece (a direct view per
engine on ipyparallel, a task pinned to a worker on Dask).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

from ._aio import Signal
from .deaths import Death
from .engines.base import Answers, OutputSink, settle
from .errors import Cancelled, ClusterStateError, EngineLost, RemoteError, TaskLost
from .onhost.calls import Failure
from .progress import CANCELLED, FAILED, Progress

if TYPE_CHECKING:
    from .onhost.calls import Result

#: Pieces an engine holds at once: one running, one waiting behind it.
DEPTH = 2
#: Seconds an answer that the engine's client gave up on waits for the verdict on its
#: engine (the supervisor asks the controller every second whom it still counts).
VERDICT = 3.0


class Engines(Protocol):
    """What a job needs of its cluster's engines (:class:`cloudlab.membership.Membership`)."""

    #: Notified whenever engines join, die or leave.
    changed: Signal

    def why_not_running(self) -> str | None:
        """Why the cluster takes no work now; None while it runs."""

    def usable(self) -> list[int]:
        """Engines that take work now."""

    def coming(self) -> bool:
        """Whether engines that are not usable yet are starting."""

    def state_of(self, eid: int) -> str | Death:
        """"alive", "dying", or how the engine left the cluster."""

    def why_none(self, job: str) -> str:
        """Why ``job`` has no engine to run on, and the fix."""

    async def submit_to(self, eid: int, fn: Callable, *args: Any) -> Result:
        """Run ``fn(*args)`` on engine ``eid``."""

    async def end(self, ids: list[int], why: str) -> None:
        """End engines ``ids`` now (they are replaced)."""


class Job:
    """Run ``call(fn, *piece)`` for each piece on ``engines``; results in order.

    ``describe(i)`` names piece ``i`` for errors ("items 100-199");
    ``on_result(i, result)`` is called as each piece's first result arrives.
    """

    def __init__(self, engines: Engines, name: str, fn: Callable, pieces: list[tuple],
                 retries: int, describe: Callable[[int], str],
                 on_result: Callable[[int, Result], None] | None = None):
        self.engines, self.name, self.fn, self.pieces = engines, name, fn, pieces
        self.retries, self.describe, self.on_result = retries, describe, on_result
        self.results: dict[int, Result] = {}
        self.queue: deque[int] = deque(range(len(pieces)))
        self.running: dict[int, dict[int, asyncio.Task]] = {}  # engine -> piece -> task
        self.charged: dict[int, list[Death]] = {}  # piece -> the deaths charged to it
        self.suspects: set[int] = set()  # pieces that were on an engine that died: run alone
        self.lost: dict[int, list[Death]] = {}  # pieces beyond their retries
        #: Engines that died under a piece of this job, with what then ran where.
        self.incidents: list[str] = []
        self.cancelled_by: str | None = None
        #: When the engine's client gave up on a task whose engine still runs.
        self.failed_at: dict[asyncio.Task, float] = {}
        self._wake = Signal()

    # ----------------------------------------------------------------- running
    async def run(self) -> list[Result]:
        try:
            while len(self.results) + len(self.lost) < len(self.pieces):
                if self.cancelled_by is not None:
                    await self._end_running(self.cancelled_by)
                    raise Cancelled(self.name, self.cancelled_by)
                self._require_cluster()
                self._take_back_from_dead_engines()
                if not self.lost:
                    self._hand_out()
                elif not self._tasks():  # a piece is lost: let what runs finish, then fail
                    break
                await self._next_event()
                self._collect()
        except asyncio.CancelledError:  # Ctrl-C in the caller, or the cluster stopping
            await self._end_running("the caller was interrupted")
            raise
        if self.lost:
            piece, deaths = next(iter(self.lost.items()))
            raise TaskLost(self.name, self.describe(piece), deaths, self.retries)
        return [self.results[i] for i in range(len(self.pieces))]

    def cancel(self, why: str = "it was cancelled") -> None:
        self.cancelled_by = why
        self._wake.notify()

    def _require_cluster(self) -> None:
        engines = self.engines
        why = engines.why_not_running()
        if why is not None:
            raise ClusterStateError(why)
        if not (engines.usable() or engines.coming() or self._tasks()):
            raise ClusterStateError(engines.why_none(self.name))

    def _tasks(self) -> list[asyncio.Task]:
        return [t for pieces in self.running.values() for t in pieces.values()]

    def _pending(self) -> list[asyncio.Task]:
        return [t for t in self._tasks() if not t.done()]

    def _hand_out(self) -> None:
        """Fill every usable engine up to DEPTH, one piece per engine per round; a
        suspect (see :meth:`_take_back_from_dead_engines`) only to an idle engine, alone."""
        engines = self.engines.usable()
        for slot in range(DEPTH):
            for eid in engines:
                if not self.queue:
                    return
                held = self.running.setdefault(eid, {})
                if len(held) > slot or self.suspects & set(held):
                    continue
                piece = self._next_piece(alone=not held)
                if piece is not None:
                    held[piece] = asyncio.ensure_future(
                        self.engines.submit_to(eid, self.fn, *self.pieces[piece]))

    def _next_piece(self, alone: bool) -> int | None:
        if alone:
            return self.queue.popleft()
        for piece in self.queue:
            if piece not in self.suspects:
                self.queue.remove(piece)
                return piece
        return None

    async def _next_event(self) -> None:
        waits = [*self._pending(), self._wake.wait(), self.engines.changed.wait()]
        verdicts = any(t.done() for t in self._tasks())  # failed tasks awaiting one
        await asyncio.wait(waits, timeout=0.25 if verdicts else None,
                           return_when=asyncio.FIRST_COMPLETED)

    def _collect(self) -> None:
        for eid, held in list(self.running.items()):
            for piece, task in list(held.items()):
                if not task.done():
                    continue
                if task.cancelled() or task.exception() is not None:
                    # The engine's client gave up on the task: did its engine die?
                    state = self.engines.state_of(eid)
                    if state != "alive":
                        # Dying (the supervisor says why within 50 ms) or gone: the pieces
                        # it held are taken back together, in the next round.
                        continue
                    if task.cancelled():
                        del held[piece]
                        self.queue.appendleft(piece)
                        continue
                    # Its engine still runs: silent, its controller may have dropped it,
                    # which the supervisor hears within a second; else the error is the task's.
                    loop = asyncio.get_running_loop()
                    if loop.time() < self.failed_at.setdefault(task, loop.time()) + VERDICT:
                        continue
                    del held[piece]
                    error = task.exception()
                    raise RemoteError({eid: (type(error).__name__, str(error), "")})
                elif piece not in self.results:
                    del held[piece]
                    self.results[piece] = task.result()
                    if self.on_result is not None:
                        self.on_result(piece, task.result())
                else:
                    del held[piece]

    def _take_back_from_dead_engines(self) -> None:
        """Pieces held by an engine that has left the cluster (died, or was ended) run again.

        Which of an engine's pieces killed it is certain only when it held one: that
        piece is charged with the death (it counts against ``retries``). When it held
        more, none is charged; each becomes a *suspect* and runs alone from then on,
        so that its next death, if it causes one, is charged to it.
        """
        for eid in list(self.running):
            death = self.engines.state_of(eid)
            if not isinstance(death, Death):
                continue
            tasks = self.running.pop(eid)
            for task in tasks.values():
                task.cancel()
            held = list(tasks)
            charged = len(held) == 1 and not death.ordered
            for piece in reversed(held):
                if not charged:
                    self.suspects.add(piece)
                self._lose(piece, death, charged)
            if held and not death.ordered:
                names = " or ".join(self.describe(p) for p in held)
                retried = [p for p in held if p not in self.lost]
                self.incidents.append(
                    f"engine {eid} {death.cause} while running {names} of {self.name}; "
                    + ("ran again elsewhere" if len(retried) == len(held) else
                       f"{self.describe(held[0])} is not retried"))

    def _lose(self, piece: int, death: Death, charged: bool) -> None:
        if piece in self.results:
            return
        deaths = self.charged.setdefault(piece, [])
        if charged:
            deaths.append(death)
        if len(deaths) <= self.retries:
            self.queue.appendleft(piece)  # first in line: it has waited longest
        else:
            self.lost[piece] = deaths

    async def _end_running(self, why: str) -> None:
        """End the engines running this job's pieces (they are replaced)."""
        busy = [eid for eid, held in self.running.items() if held]
        for task in self._tasks():
            task.cancel()
        self.running.clear()
        self.queue.clear()
        if busy:
            await self.engines.end(busy, why)


async def run_in_view(job: Job, progress: Progress, tell: Callable[[str], None]) -> list[Result]:
    """Run ``job`` shown by ``progress``: its Stop button cancels the job, its end finishes
    the view (done is the caller's to say), and each engine that died under the job is
    told in one line."""
    loop = asyncio.get_running_loop()

    def stop() -> None:
        loop.call_soon_threadsafe(job.cancel, "its Stop button was pressed")

    progress.on_stop = stop
    try:
        return await job.run()
    except (asyncio.CancelledError, Cancelled):
        progress.finish(CANCELLED)
        raise
    except BaseException as error:
        progress.finish(FAILED, str(error).split("\n", 1)[0])
        raise
    finally:
        progress.on_stop = None
        for line in job.incidents:
            tell(line)


async def on_each(engines: Engines, ids: list[int], call: str,
                  send: Callable[[], Awaitable[Answers]], sink: OutputSink) -> dict[int, Result]:
    """Send a call to each engine of ``ids`` (``send()``) and wait for every answer, watching
    the engines meanwhile: one that dies or stops answering ends the wait for its answer,
    and the call (named ``call`` in errors: "run f") raises :class:`EngineLost` naming it
    and its cause, once the others have answered (what they printed goes to ``sink``).

    Neither engine kind ends such a wait by itself: Dask keeps a task pinned to a dead
    worker for ever, and ipyparallel fails it with an error of its own."""
    loop = asyncio.get_running_loop()
    deaths: dict[int, Death] = {}
    answers: Answers = {}
    sending = asyncio.ensure_future(send())
    try:
        while not sending.done() and not (deaths := _lost(engines, ids)):
            await asyncio.wait([sending, engines.changed.wait()],
                               return_when=asyncio.FIRST_COMPLETED)
        if deaths:
            sending.cancel()
            raise EngineLost(call, deaths.values(), {})
        answers = dict(sending.result())
        results: dict[int, Result] = {}
        # Engine -> since when its process has ended, or its client gave up on its answer,
        # while it is still a member: the supervisor's verdict is awaited, for VERDICT.
        doubted: dict[int, float] = {}
        while answers:
            for eid, answer in list(answers.items()):
                state = engines.state_of(eid)
                if isinstance(state, Death):
                    deaths[eid] = state
                elif answer.done() and not answer.cancelled() and answer.exception() is None:
                    results[eid] = answer.result()
                elif state == "alive" and not answer.done():
                    continue
                elif loop.time() < doubted.setdefault(eid, loop.time()) + VERDICT:
                    continue
                else:
                    deaths[eid] = Death(eid, "ended while answering" if state == "dying" else
                                        f"could not answer ({_described(answer)})")
                answers.pop(eid).cancel()
            if answers:
                await asyncio.wait([*(a for a in answers.values() if not a.done()),
                                    engines.changed.wait()], timeout=0.25 if doubted else None,
                                   return_when=asyncio.FIRST_COMPLETED)
    finally:
        sending.cancel()
        for answer in answers.values():
            answer.cancel()  # (the caller was interrupted)
    if deaths:
        failed = {eid: r for eid, r in results.items() if isinstance(r.value, Failure)}
        try:
            settle(results.values(), sink)
            remote_error = None
        except RemoteError as error:
            remote_error = error
        raise EngineLost(call, [deaths[eid] for eid in sorted(deaths)],
                         {eid: r.value for eid, r in results.items() if eid not in failed},
                         remote_error)
    return results


def _lost(engines: Engines, ids: list[int]) -> dict[int, Death]:
    return {eid: state for eid in ids if isinstance(state := engines.state_of(eid), Death)}


def _described(answer: asyncio.Future) -> str:
    error = answer.exception()
    return f"{type(error).__name__}: {error}".strip().rstrip(":") if error else "cancelled"


def describe_items(starts: list[int], sizes: list[int]) -> Callable[[int], str]:
    """Names for the chunks of a map: 'item 7', 'items 100-199'."""

    def describe(piece: int) -> str:
        first, size = starts[piece], sizes[piece]
        return f"item {first}" if size == 1 else f"items {first}-{first + size - 1}"

    return describe

"""The work a Cluster runs on its engines: map, submit, run, cancel, and the user's code.

A part of :class:`~cloudlab.Cluster` kept in a module of its own, as
:mod:`cloudlab.namespaces` is; what it relies on of the cluster is declared at
the top of the class. ``map`` runs as a :class:`~cloudlab.dispatch.Job`, so that
cloudlab knows where each piece runs (deaths, retries, cancel); ``submit`` and
``run`` go through the engine kind's own client.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from . import _aio, policy, usercode
from .dispatch import VERDICT, Job, describe_items, on_each, run_in_view
from .engines.base import OutputSink, settle
from .errors import CloudlabError, ClusterStateError, RemoteError, TaskLost
from .onhost import calls
from .output import CallerQueue, PrefixedSink
from .progress import DONE, FAILED, Progress, open_progress

if TYPE_CHECKING:
    from .engines.base import Engine
    from .membership import Membership


class EngineWork:
    """Functions run on the engines; mixed into :class:`~cloudlab.Cluster`."""

    #: Items of work (map items, submits) each engine has finished, by engine id.
    tasks_done: Counter[int]
    #: The jobs running now (``cancel`` ends them).
    _jobs: set[Job]
    #: Submits not answered yet (a stop answers them), with their functions' names.
    _submits: dict[concurrent.futures.Future, str]
    #: The user's modules, sent to the engines when they change.
    _code: usercode.EngineCode

    if TYPE_CHECKING:  # what the cluster gives (see cloudlab.cluster.Cluster)
        profile: Any
        state: str

        def _cut_short_by(self) -> str: ...

        @property
        def engine_ids(self) -> list[int]: ...

        @property
        def _members(self) -> Membership: ...

        _membership: Membership | None

        @property
        def _engine(self) -> Engine: ...

        def _require_running(self) -> None: ...

        async def _joined(self) -> None: ...

        def _engine_names(self) -> frozenset[str]: ...

    def cancel(self) -> int:
        """Stop every job (``map``) running on this cluster now; returns how many.

        Work not yet handed out is dropped; engines running pieces of a job are
        ended and replaced (no engine can stop a task that has started). The
        jobs raise :class:`~cloudlab.errors.Cancelled`.
        """
        return _aio.run(self._cancel())

    async def acancel(self) -> int:
        return await _aio.wrap(self._cancel())

    async def _cancel(self, why: str = "it was cancelled") -> int:
        jobs = list(self._jobs)
        for job in jobs:
            job.cancel(why)
        return len(jobs)

    def map(self, fn: Callable, items: Iterable, chunksize: int | None = None,
            on_result: Callable[[int, Any], None] | None = None) -> list:
        """``[fn(x) for x in items]`` across the engines, in order; chunked automatically.

        Shows progress (a bar in Jupyter or a terminal) while it runs; what ``fn``
        prints on the engines appears here, each line prefixed by the engine id.
        ``on_result(index, value)`` is called here, in this thread, as each item's
        chunk finishes (in completion order): for live plots of partial results.
        """
        items, progress = self._open_map(fn, items)
        caller = CallerQueue()
        return _aio.run(self._map(fn, items, chunksize, progress, caller, on_result),
                        drain=caller.drain)

    async def amap(self, fn: Callable, items: Iterable, chunksize: int | None = None,
                   on_result: Callable[[int, Any], None] | None = None) -> list:
        items, progress = self._open_map(fn, items)
        caller = CallerQueue()
        try:
            return await _aio.wrap(self._map(fn, items, chunksize, progress, caller, on_result))
        finally:
            caller.drain()

    def _open_map(self, fn: Callable, items: Iterable) -> tuple[list, Progress | None]:
        """Materialise ``items`` and open the progress view in the caller's thread."""
        self._require_running()
        items = list(items)
        name = getattr(fn, "__name__", type(fn).__name__)
        return items, (open_progress(f"map {name}", len(items)) if items else None)

    def submit(self, fn: Callable, *args: Any) -> concurrent.futures.Future:
        """Run ``fn(*args)`` on one engine; returns a future (``.result()`` waits)."""
        self._require_running()
        shipped = calls.Shipped(fn, self._engine_names())
        future: concurrent.futures.Future = concurrent.futures.Future()
        future.set_running_or_notify_cancel()  # sent: .cancel() cannot withdraw it (c.cancel() can)
        self._submits[future] = _name_of(fn)
        future.add_done_callback(lambda done: self._submits.pop(done, None))
        sent = self._engine.submit_now(shipped, *args) if self._code.current() else None
        if sent is None:
            _aio.submit(self._submit(shipped, *args)).add_done_callback(
                lambda done: _settle_once(future, done))
            return future
        since = time.time()

        def settle(done: concurrent.futures.Future) -> None:
            try:
                value = self._settled_value(done.result())
            except BaseException as error:
                said = _aio.submit(self._submit_error(fn, since, error))
                said.add_done_callback(lambda said: _settle_once(future, error=said.result()))
            else:
                _settle_once(future, value=value)

        sent.add_done_callback(settle)
        return future

    def _end_submits(self) -> None:
        """The cluster ended: submits still waiting get an answer (their tasks went with
        it), rather than waiting for ever."""
        for future, name in list(self._submits.items()):
            _settle_once(future, error=self._cut_short(name))

    def _cut_short(self, name: str) -> ClusterStateError:
        return ClusterStateError(f"submit {name} did not finish: {self._cut_short_by()}")

    async def asubmit(self, fn: Callable, *args: Any) -> Any:
        """Run ``fn(*args)`` on one engine and return its result."""
        self._require_running()
        return await _aio.wrap(self._submit(calls.Shipped(fn, self._engine_names()), *args))

    async def _submit(self, shipped: calls.Shipped, *args: Any) -> Any:
        self._require_running()
        await self._sync_code()
        since = time.time()
        try:
            result = await self._engine.submit(shipped, *args)
        except Exception as error:
            raise await self._submit_error(shipped, since, error) from None
        return self._settled_value(result)

    async def _submit_error(self, fn: Callable, since: float,
                            error: BaseException) -> BaseException:
        """What a submit raises when the engine kind's scheduler gave its task up: one
        cloudlab sentence naming the engines that died under it (past task_retries), once
        the supervisor has said why (within VERDICT seconds)."""
        members = self._membership
        if self.state != "running":  # (the engine kind's client cancels what it had)
            return self._cut_short(_name_of(fn))
        cancelled = (asyncio.CancelledError, concurrent.futures.CancelledError)
        if isinstance(error, (CloudlabError, *cancelled)) or members is None:
            return error  # (a cancel is no fault to explain)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + VERDICT
        while (not (deaths := [d for d in members.deaths.values() if d.at >= since])
               and loop.time() < deadline):
            await asyncio.wait([members.changed.wait()], timeout=0.1)
        if not deaths:
            return error
        return TaskLost(f"submit {_name_of(fn)}", "its task", deaths,
                        self.profile.cluster.task_retries)

    def _settled_value(self, result: calls.Result) -> Any:
        settle([result], PrefixedSink())
        self.tasks_done[result.engine] += 1
        return result.value

    def run(self, fn: Callable, *args: Any) -> dict[int, Any]:
        """Run ``fn(*args)`` once on every engine; results by engine id."""
        self._require_running()
        caller = CallerQueue()
        return _aio.run(self._on(None, fn, *args, sink=caller.output, ship=True),
                        drain=caller.drain)

    async def arun(self, fn: Callable, *args: Any) -> dict[int, Any]:
        self._require_running()
        caller = CallerQueue()
        try:
            return await _aio.wrap(self._on(None, fn, *args, sink=caller.output, ship=True))
        finally:
            caller.drain()

    async def _on(self, ids: list[int] | None, fn: Callable, *args: Any,
                  sink: OutputSink | None = None, ship: bool = False,
                  call: str | None = None) -> dict[int, Any]:
        """Run ``fn(*args)`` on each engine of ``ids`` (None: every engine); values by id.
        ``call`` names it in errors (default: "run" and the function's name)."""
        await self._joined()
        await self._sync_code()
        ids = self.engine_ids if ids is None else ids
        call = call or f"run {getattr(fn, '__name__', type(fn).__name__)}"
        if ship:
            fn = calls.Shipped(fn, self._engine_names())
        return await self._each(ids, call, fn, *args, sink=sink)

    async def _each(self, ids: list[int], call: str, fn: Callable, *args: Any,
                    sink: OutputSink | None = None) -> dict[int, Any]:
        """``fn(*args)`` on each engine of ``ids``, watched (:func:`~cloudlab.dispatch.on_each`);
        what they printed to ``sink``, their failures raised; values by engine id."""
        sink = sink or PrefixedSink()
        results = await on_each(self._members, ids, call,
                                lambda: self._engine.run_each(ids, fn, *args), sink)
        settle(results.values(), sink)
        return {eid: r.value for eid, r in results.items()}

    # ----------------------------------------------------------- the user's code
    def sync(self) -> usercode.Bundle | None:
        """Send the user's own modules (files beside the notebook or script, editable
        installs) to every engine now, if they changed; what the engines now have.

        Calls that send work do this by themselves, when a module was imported or edited
        since; this is for code that imports modules by name on the engines. The async
        twin is ``await c.async_()`` (``async`` is a keyword).
        """
        return _aio.run(self._sync_code(rescan=True))

    async def async_(self) -> usercode.Bundle | None:
        return await _aio.wrap(self._sync_code(rescan=True))

    @property
    def code(self) -> usercode.Bundle | None:
        """The user's modules as the engines have them (None: none sent yet)."""
        return self._code.bundle

    async def _sync_code(self, rescan: bool = False) -> usercode.Bundle | None:
        self._require_running()
        return await self._code.sync(rescan)

    async def _install_code(self, ids: list[int], bundle: usercode.Bundle) -> None:
        if self._engine.shares_client_modules:
            return
        await self._each(ids, "sending your modules", calls.install_code, bundle.digest,
                         bundle.archive, bundle.modules)

    async def _map(self, fn: Callable, items: list, chunksize: int | None,
                   progress: Progress | None = None, caller: CallerQueue | None = None,
                   on_result: Callable[[int, Any], None] | None = None) -> list:
        self._require_running()
        if not items:
            return []
        if chunksize is not None and (not isinstance(chunksize, int) or chunksize < 1):
            raise ValueError(f"chunksize must be a positive whole number, not {chunksize!r}.")
        progress = progress or Progress("map", len(items))
        await self._sync_code()
        size = chunksize or policy.choose_chunksize(len(items), len(self.engine_ids))
        shipped = calls.Shipped(fn, self._engine_names())
        chunks = policy.split(items, size)
        starts = [i * size for i in range(len(chunks))]
        sink = caller.output if caller else PrefixedSink()
        call = caller.call if caller else _call  # (in the caller's thread, where it waits)
        failures = {}

        def arrived(piece: int, result: calls.Result) -> None:
            try:
                settle([result], sink)
            except RemoteError as error:
                failures.update(error.failures)
            self.tasks_done[result.engine] += len(chunks[piece])
            progress.advance(len(chunks[piece]))
            if on_result is not None and not isinstance(result.value, calls.Failure):
                for offset, value in enumerate(result.value):
                    call(on_result, starts[piece] + offset, value)

        job = Job(self._members, f"map {_name_of(fn)}", calls.run_chunk,
                  [(shipped, chunk) for chunk in chunks], self.profile.cluster.task_retries,
                  describe_items(starts, [len(c) for c in chunks]), arrived)
        self._jobs.add(job)
        try:
            results = await run_in_view(job, progress,
                                        lambda line: call(_tell, f"cloudlab: {line}"))
        finally:
            self._jobs.discard(job)
        if failures:
            error = RemoteError(failures)
            progress.finish(FAILED, str(error).split("\n", 1)[0])
            raise error
        progress.finish(DONE)
        return [x for r in results for x in r.value]


def _call(fn, *args) -> None:
    fn(*args)


def _tell(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _settle_once(future: concurrent.futures.Future, done: concurrent.futures.Future | None = None,
                 value: Any = None, error: BaseException | None = None) -> None:
    """Give ``future`` its answer (``done``'s, or ``value`` or ``error``) unless a stop
    gave it one first."""
    if done is not None:
        error = done.exception() if not done.cancelled() else concurrent.futures.CancelledError()
        value = None if error is not None else done.result()
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


def _name_of(fn: Callable) -> str:
    """How a submit names its function in sentences."""
    return getattr(fn, "__name__", "f")

"""Engines that are threads of the client's own process: the fast, scriptable kind.

``Cluster(4, engine="inprocess", backend="inprocess")`` starts in milliseconds
and runs every call of cloudlab's API, with each engine's own namespace and
output, and the work pickled both ways as between processes. Nothing is
isolated (a function that crashes the interpreter takes the client with it),
so this is for tests and for trying code quickly, as distributed's
``LocalCluster(processes=False)`` is. Its processes are the ``inprocess``
backend's handles (:mod:`cloudlab.backends.inprocess`), which a test can kill,
freeze or delay, so membership, replacement and retries are tested in a
fraction of a second and deterministically.

The controller is a :class:`Hub` registered under the cluster's workdir; an
engine is a :class:`Worker`, a daemon thread that joins the hub once its
process has started and leaves it when its process ends.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import queue
import threading
from collections.abc import Callable
from typing import Any

import cloudpickle

from ..backends.base import Backend, Command
from ..errors import ConfigError
from ..onhost import calls
from ..onhost.calls import Result
from .base import Answers, Engine, OutputSink, wait_until

#: The hub of each running in-process cluster, by its workdir.
HUBS: dict[str, Hub] = {}


class EngineEnded(Exception):
    """The engine a task was sent to ended before the task did."""


class _Crashed(BaseException):
    """Unwinds a task whose engine :func:`crash` ended."""


#: The worker this thread is.
_this = threading.local()


def crash(code: int = -9, last_words: str | None = None) -> None:
    """End the engine running this task, as a crash would (a signal where ``code`` is
    negative, an exit otherwise), saying ``last_words`` if given: for tests of deaths."""
    _this.worker.process.kill(code, last_words)
    raise _Crashed


class Worker:
    """One engine: a thread running the tasks sent to it, one at a time, in its namespace."""

    def __init__(self, eid: int, process: Any):
        self.eid, self.process = eid, process
        self.namespace: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.pending: set[concurrent.futures.Future] = set()
        self.running = 0
        #: Held while a task's future changes state (the worker's thread, or end()).
        self.lock = threading.Lock()
        threading.Thread(target=self._serve, name=f"cloudlab-inprocess-{eid}",
                         daemon=True).start()

    def send(self, work: Callable[[], Any]) -> concurrent.futures.Future:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)
        self.tasks.put((work, future))
        return future

    def _serve(self) -> None:
        _this.worker = self
        with calls.as_engine(self.eid, self.namespace):
            while True:
                work, future = self.tasks.get()
                if work is None:
                    return
                self.process.thawed.wait()  # a frozen engine takes no work
                with self.lock:
                    if future.done() or not future.set_running_or_notify_cancel():
                        continue  # withdrawn, or its engine ended
                self.running += 1
                value, error_ = None, None
                try:
                    value = work()
                except _Crashed:
                    return
                except BaseException as error:  # (cloudlab's own helpers do not raise)
                    error_ = error
                finally:
                    self.running -= 1
                self.process.thawed.wait()  # nor answers
                with self.lock:
                    if future.done():
                        continue  # its engine ended meanwhile
                    if error_ is not None:
                        future.set_exception(error_)
                    else:
                        future.set_result(value)

    def end(self) -> None:
        """The engine's process ended: its tasks fail, its thread stops after the current."""
        with self.lock:
            for future in list(self.pending):
                if not future.done():
                    future.set_exception(EngineEnded(f"engine {self.eid} ended"))
        self.tasks.put((None, None))


class Hub:
    """The controller: which engines have joined."""

    def __init__(self) -> None:
        self.workers: dict[int, Worker] = {}


def _hub_of(workdir: str) -> Hub | None:
    return HUBS.get(workdir)


async def controller_main(process: Any, workdir: str) -> None:
    HUBS[workdir] = Hub()
    try:
        await asyncio.Event().wait()  # until its process ends
    finally:
        hub = HUBS.pop(workdir)
        for worker in hub.workers.values():
            worker.end()


async def engine_main(process: Any, workdir: str, eid: str) -> None:
    while (hub := _hub_of(workdir)) is None:  # engines wait for their controller
        await asyncio.sleep(0.01)
    worker = hub.workers[int(eid)] = Worker(int(eid), process)
    try:
        await asyncio.Event().wait()
    finally:
        if hub.workers.get(worker.eid) is worker:
            del hub.workers[worker.eid]
        worker.end()


def _run_packed(packed: bytes) -> bytes:
    """On the worker: a call pickled as between processes, its Result pickled back."""
    fn, args = cloudpickle.loads(packed)
    return cloudpickle.dumps(calls.call(fn, *args))


class InProcessEngine(Engine):
    name = "inprocess"
    short_name = "inproc"
    mb_per_engine = 1
    preload = ()
    client_modules = ()
    notices_death_within = 0.1
    shares_client_modules = True

    @classmethod
    def check_backend(cls, backend: Backend) -> None:
        from ..backends.inprocess import InProcessBackend

        if not isinstance(backend, InProcessBackend):
            raise ConfigError(f"The inprocess engine kind runs as threads of this process, on "
                              f"the inprocess backend, not on {backend.name}: add --backend "
                              f"inprocess, or choose ipyparallel or dask.")

    @property
    def _key(self) -> str:
        return str(self.workdir)

    def controller_command(self) -> Command:
        return Command("controller", "cloudlab.engines.inprocess:controller_main", (self._key,),
                       controller=True)

    def engine_command(self, engine_id: int) -> Command:
        return Command(f"engine-{engine_id}", "cloudlab.engines.inprocess:engine_main",
                       (self._key, str(engine_id)))

    async def connect(self, controller_alive, timeout: float, reach=None) -> None:
        await wait_until(lambda: _hub_of(self._key) is not None, controller_alive, timeout,
                         "controller", every=0.005)

    @property
    def client(self) -> Hub | None:
        """The hub itself: engines' namespaces and threads, for a test to look at."""
        return _hub_of(self._key)

    def _workers(self) -> dict[int, Worker]:
        hub = _hub_of(self._key)
        return {} if hub is None else hub.workers

    async def ready_ids(self) -> set[int]:
        return {eid for eid, worker in self._workers().items()
                if worker.process.silent_for() <= self.heartbeat_timeout}

    async def busy_ids(self) -> set[int]:
        return {eid for eid, w in self._workers().items() if w.running}

    async def _on(self, eid: int, work: Callable[[], Any]) -> Any:
        worker = self._workers().get(eid)
        if worker is None:
            raise EngineEnded(f"engine {eid} is not registered")
        return await asyncio.wrap_future(worker.send(work))

    async def submit_to(self, engine_id: int, fn: Callable, *args: Any) -> Result:
        packed = cloudpickle.dumps((fn, args))
        return cloudpickle.loads(await self._on(engine_id, lambda: _run_packed(packed)))

    async def submit(self, fn: Callable, *args: Any) -> Result:
        """On the least busy engine; again elsewhere, up to ``task_retries`` times, where its
        engine ends first (as the engines' own schedulers do)."""
        for attempt in range(self.task_retries + 1):
            workers = self._workers()
            if not workers:
                raise EngineEnded("no engine is registered")
            eid = min(workers, key=lambda e: (len(workers[e].pending), e))
            try:
                return await self.submit_to(eid, fn, *args)
            except EngineEnded:
                if attempt == self.task_retries:
                    raise
        raise AssertionError("unreachable")

    async def run_each(self, ids: list[int], fn: Callable, *args: Any) -> Answers:
        return {eid: asyncio.ensure_future(self.submit_to(eid, fn, *args)) for eid in ids}

    async def execute_each(self, code: str, ids: list[int], sink: OutputSink) -> Answers:
        loop = asyncio.get_running_loop()

        def cell(eid: int) -> Callable[[], Result]:
            def run() -> Result:
                process = _this.worker.process

                def send(stream: str, text: str) -> None:
                    if process.alive():  # (a thread outlives its "process": it says nothing)
                        loop.call_soon_threadsafe(sink, eid, stream, text)

                streams = [calls.LineStream(lambda text, s=s: send(s, text))
                           for s in ("stdout", "stderr")]
                with calls.captured(*streams):
                    try:
                        exec(compile(code, "<cell>", "exec"), calls.namespace())
                        value = None
                    except Exception as exc:
                        value = calls.Failure(exc)
                for stream in streams:
                    stream.flush()
                return Result(eid, value)
            return run

        async def answer(eid: int) -> Result:
            result = await self._on(eid, cell(eid))
            await asyncio.sleep(0)  # the output sent just before the result, first
            return result

        return {eid: asyncio.ensure_future(answer(eid)) for eid in ids}

    async def forget(self, ids: list[int]) -> None:
        workers = self._workers()
        for eid in ids:
            worker = workers.pop(eid, None)
            if worker is not None:
                worker.end()

    async def gone(self, ids: list[int]) -> None:
        await self.forget(ids)

    async def close(self) -> None:
        pass

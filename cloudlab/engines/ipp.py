"""ipyparallel: ``ipcontroller`` plus one ``ipengine`` per engine.

The controller runs its schedulers in threads and beats its heart every
100 ms (the default 3 s heartbeat is what makes raw ipyparallel slow to
register engines); engines run without their per-engine nanny process, since
cloudlab's agent already ties each engine's life to its owner.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import time
from collections.abc import Callable
from typing import Any, cast

from .. import _aio
from ..backends.base import Command
from ..errors import StartError
from ..onhost.calls import Failure, Result, call
from ..security import ipyparallel_env
from .base import Answers, Engine, OutputSink, wait_for_file, whole_json

CLUSTER_ID = "cloudlab"
#: The controller's ports a client connects to (its connection file's keys).
CLIENT_PORTS = ("registration", "control", "mux", "task", "iopub", "notification", "broadcast")
HEARTBEAT_MS = 100
# ipyparallel's apps chdir to a work_dir whose default is the directory at *import* time;
# forked from a fork server, that is the server's, not the one the process starts in.
WORK_DIR = "--work-dir=."


class IPyParallelEngine(Engine):
    name = "ipyparallel"
    short_name = "ipp"
    mb_per_engine = 120
    # What an engine imports while it starts (the kernel's debugger alone is 0.1 s of CPU).
    preload = ("ipyparallel.controller.app", "ipyparallel.engine.app", "ipykernel.ipkernel",
               "ipykernel.debugger", "IPython.core.completerlib", "IPython.extensions.storemagic",
               "cloudlab.onhost.calls", "numpy.random")
    # ipyparallel's serializer imports NumPy at the first task (0.1-0.2 s on this machine).
    client_modules = ("ipyparallel", "numpy")
    notices_death_within = 2.5  # (cloudlab tells the hub of each death: see gone)

    _client: Any = None
    _balanced: Any = None  # the load-balanced view, made once

    def __init__(self, workdir, ip, task_retries: int = 2, remote: bool = False,
                 heartbeat_timeout: float = 10.0):
        super().__init__(workdir, ip, task_retries, remote, heartbeat_timeout)
        self._direct: dict[int, Any] = {}  # a direct view per engine, made once

    @property
    def profile_dir(self):
        return self.workdir / "ipp"

    def _connection_file(self, who: str):
        return self.profile_dir / "security" / f"ipcontroller-{CLUSTER_ID}-{who}.json"

    def _common_env(self) -> dict[str, str]:
        # Engines run an IPython shell: keep its history and config out of ~/.ipython.
        return {"IPYTHONDIR": str(self.workdir / "ipython"), **ipyparallel_env(self.remote)}

    def controller_command(self) -> Command:
        # Engines start alongside the controller and need the profile directory at once.
        (self.profile_dir / "security").mkdir(parents=True, exist_ok=True)
        return Command(
            "controller",
            "cloudlab.engines.ipp:controller_main",
            (f"--ip={self.ip}", f"--profile-dir={self.profile_dir}", f"--cluster-id={CLUSTER_ID}",
             WORK_DIR,
             f"--HeartMonitor.period={HEARTBEAT_MS}",
             # The hub unregisters an engine whose heart is silent this long (the heart
             # answers from a thread of its own, without the GIL, also while a task runs).
             "--HeartMonitor.max_heartmonitor_misses="
             f"{max(1, round(self.heartbeat_timeout * 1000 / HEARTBEAT_MS))}",
             "--usethreads", "--log-level=WARN"),
            self._common_env(),
            self.preload,
            spawn_if_cold=True,
            controller=True,
            writes=(self._connection_file("client"), self._connection_file("engine")),
        )

    def engine_command(self, engine_id: int) -> Command:
        return Command(
            f"engine-{engine_id}",
            "cloudlab.engines.ipp:engine_main",
            (f"--file={self._connection_file('engine')}", f"--profile-dir={self.profile_dir}",
             WORK_DIR,
             f"--IPEngine.id={engine_id}", "--IPEngine.enable_nanny=False",
             "--IPEngine.wait_for_url_file=120", "--HistoryManager.enabled=False",
             "--log-level=ERROR"),
            {**self._common_env(), "CLOUDLAB_ENGINE_ID": str(engine_id)},
            self.preload,
            files=(self._connection_file("engine"),),
        )

    async def connect(self, controller_alive: Callable[[], bool], timeout: float,
                      reach=None) -> None:
        import ipyparallel

        path = self._connection_file("client")
        await wait_for_file(path, controller_alive, timeout, "ipyparallel controller")
        if reach is not None:
            path = await self._reachable(path, reach)
        try:
            with _curve_signs_instead(self.remote):
                self._client = await _aio.to_thread(ipyparallel.Client, str(path),
                                                    timeout=timeout)
        except Exception as e:
            raise StartError(f"Could not connect to the ipyparallel controller: {e}") from e

    async def _reachable(self, path, reach):
        """The client's connection file as this machine reaches the controller: a copy with
        the addresses ``reach`` gives, where they differ (tunnels)."""
        info = json.loads(path.read_text())
        host = info["interface"].split("://", 1)[1]
        keys = [k for k in CLIENT_PORTS if isinstance(info.get(k), int)]
        asked = [(host, info[k]) for k in keys]
        there = await reach(asked)
        if there == asked:
            return path
        info["interface"] = f"tcp://{there[0][0]}"
        info.update({k: port for k, (_, port) in zip(keys, there)})
        local = path.with_name(path.stem + "-here.json")
        local.write_text(json.dumps(info))
        return local

    @property
    def client(self):
        return self._client

    async def ready_ids(self) -> set[int]:
        return set(self._client.ids) if self._client is not None else set()

    async def busy_ids(self) -> set[int]:
        status = await _aio.to_thread(self._client.queue_status)
        return {eid for eid, s in status.items()
                if isinstance(eid, int) and (s.get("queue", 0) or s.get("tasks", 0))}

    async def submit(self, fn: Callable, *args: Any) -> Result:
        return await asyncio.wrap_future(self.submit_now(fn, *args))

    def submit_now(self, fn: Callable, *args: Any):
        # ipyparallel's client sends from its own IO thread: safe from any thread.
        if self._balanced is None:
            self._balanced = self._client.load_balanced_view()
            # A task whose engine died is run again elsewhere, by ipyparallel's scheduler.
            # (cloudlab's calls.call returns a task's own exception as a value, so these
            # retries never rerun a task that merely raised.)
            self._balanced.set_flags(retries=self.task_retries)
        return self._balanced.apply_async(call, fn, *args)

    async def submit_to(self, engine_id: int, fn: Callable, *args: Any) -> Result:
        return await _answer(engine_id, self._view(engine_id).apply_async(call, fn, *args))

    def _view(self, engine_id: int):
        view = self._direct.get(engine_id)
        if view is None:
            view = self._direct[engine_id] = self._client.direct_view(targets=engine_id)
        return view

    async def gone(self, ids: list[int]) -> None:
        # The hub would unregister a dead engine after heartbeat_timeout of missed beats; an
        # unregistration request, sent as the engine itself would, does it now. The hub
        # sends no reply, so it goes out raw, from the client's IO thread.
        client = self._client
        for eid in ids:
            self._direct.pop(eid, None)
            client._io_loop.add_callback(
                client.session.send, client._query_stream, "unregistration_request",
                content={"id": eid})

    async def run_each(self, ids: list[int], fn: Callable, *args: Any) -> Answers:
        # (A view of several engines sends one message per engine all the same.)
        return {eid: asyncio.ensure_future(
            _answer(eid, self._view(eid).apply_async(call, fn, *args))) for eid in ids}

    async def execute_each(self, code: str, ids: list[int], sink: OutputSink) -> Answers:
        return {eid: asyncio.ensure_future(
            _cell(eid, self._view(eid).execute(code, silent=False, block=False), sink))
            for eid in ids}

    async def forget(self, ids: list[int]) -> None:
        """Ask engines ``ids`` to shut down, and wait a little for the hub to let them go.
        Never for ever: shutdown(block=True) waits on replies an engine killed meanwhile
        never sends (seen to hang a scale-down), and the backend ends them anyway."""
        if not ids:
            return
        try:
            await _aio.to_thread(self._client.shutdown, targets=list(ids), block=False)
        except Exception:  # already gone: the backend kills it anyway
            return
        deadline = time.monotonic() + FORGET_WAIT
        while set(ids) & set(self._client.ids) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = self._balanced = None
            self._direct.clear()


#: Seconds a scale-down waits for the hub to unregister the engines it shuts down.
FORGET_WAIT = 2.0


async def _answer(eid: int, reply: concurrent.futures.Future) -> Result:
    """ipyparallel's future of engine ``eid``'s reply, awaited; an error the engine raised
    outside cloudlab's call (unpickling the function, say) as a Failure. Shielded: a cancel
    must not reach it, as its IO thread still completes it when the reply (or the engine's
    death) arrives."""
    from ipyparallel.error import RemoteError as IPPRemoteError

    answer = asyncio.wrap_future(reply)
    answer.add_done_callback(_aio.mark_seen)  # an abandoned task's late error is nobody's
    try:
        return await asyncio.shield(answer)
    except IPPRemoteError as e:
        return _failure(eid, e)


async def _cell(eid: int, result: Any, sink: OutputSink) -> Result:
    """Engine ``eid``'s run of a cell (ipyparallel's AsyncResult), its output sent to
    ``sink`` as it comes; the cell's error as a Failure."""
    from ipyparallel.error import RemoteError as IPPRemoteError

    sent = {"stdout": 0, "stderr": 0}

    def forward() -> None:
        metadata = result.metadata  # (one engine's: a view of one engine unwraps lists)
        for name in sent:
            text = metadata.get(name) or ""
            if len(text) > sent[name]:
                sink(eid, name, text[sent[name]:])
                sent[name] = len(text)

    while not result.done():
        forward()
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.05)  # iopub can trail the reply a little
    forward()
    try:
        result.get()
    except IPPRemoteError as e:
        return _failure(eid, e)
    return Result(eid, None)


def _failure(eid: int, error: Any) -> Result:
    """What engine ``eid`` raised (an ipyparallel RemoteError), as the Failure it answered;
    ipyparallel's EngineError is raised again: its engine died or went silent, which is
    cloudlab's to judge (:func:`cloudlab.dispatch.on_each`)."""
    if error.ename == "EngineError":
        raise error
    return Result(eid, Failure.of(eid, error.ename, error.evalue, error.traceback or ""))


def engine_main() -> None:
    """``ipengine``, once the controller's connection file is complete.

    Engines start alongside their controller. ipengine waits for the file to
    exist, polling every 0.1 s, but may then read it half-written; this waits
    (every 10 ms) until it parses.
    """
    import sys
    import time
    from pathlib import Path

    from ipyparallel.engine.app import main

    path = Path(next(a.partition("=")[2] for a in sys.argv if a.startswith("--file=")))
    deadline = time.monotonic() + 120
    while not whole_json(path) and time.monotonic() < deadline:
        time.sleep(0.01)
    main()


def controller_main() -> None:
    """``ipcontroller``, without two waits that every start pays.

    ``IPController.init_hub`` sleeps a quarter second after creating its
    database, though nothing has connected yet: that call runs with a ``time``
    whose ``sleep`` returns at once. And the heart monitor accepts a new
    engine only at the beat *after* its first pong, a whole period later:
    here it accepts it as the pong arrives. The test suite starts every
    ipyparallel cluster through this path.
    """
    import time

    import ipyparallel.controller.app as app

    _accept_new_hearts_at_once(app.HeartMonitor)
    _rerun_lost_tasks_at_once(app.TaskScheduler)

    init_hub = app.IPController.init_hub

    def init_hub_without_pause(self) -> None:
        app.time = _TimeWithoutSleep()
        try:
            init_hub(self)
        finally:
            app.time = time

    app.IPController.init_hub = init_hub_without_pause
    app.main()


def _accept_new_hearts_at_once(monitor_class) -> None:
    """Register an engine at its first pong instead of at the next beat.

    ``beat`` treats any heart in ``responses`` but not in ``hearts`` as new;
    one added to ``hearts`` here has answered the current ping, so ``beat``
    counts it as good, and everything else it does is unchanged. The monitor
    runs in a forked process, which inherits this patch.
    """
    handle_pong = monitor_class.handle_pong

    def handle_pong_accepting_new(self, msg) -> None:
        handle_pong(self, msg)
        heart = msg[0]
        if heart in self.responses and heart not in self.hearts:
            self.handle_new_hearts({heart})

    monitor_class.handle_pong = handle_pong_accepting_new


def _rerun_lost_tasks_at_once(scheduler_class) -> None:
    """Rerun the tasks of an engine that left as it is unregistered, not 5 s later.

    The scheduler waits in case their results are still on the way; but the hub
    unregisters an engine when cloudlab says it died, or when its heart went
    silent (cloudlab then ends it): nothing more will come from it. The late
    call the scheduler still makes finds the engine's lists scrubbed, and stops.
    """
    unregister, strand = scheduler_class._unregister_engine, scheduler_class.handle_stranded_tasks

    def handle_stranded_once(self, engine) -> None:
        if engine in self.completed:  # (handling them scrubs it)
            strand(self, engine)

    def unregister_and_rerun(self, uid) -> None:
        unregister(self, uid)
        if self.pending.get(uid):
            handle_stranded_once(self, uid)

    scheduler_class.handle_stranded_tasks = handle_stranded_once
    scheduler_class._unregister_engine = unregister_and_rerun


class _TimeWithoutSleep:
    def __getattr__(self, name):
        import time

        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        pass


@contextlib.contextmanager
def _curve_signs_instead(remote: bool):
    """Silence jupyter_client's "Message signing is disabled. This is insecure" while a
    client connects over CurveZMQ: ipyparallel turns HMAC signing off there because every
    connection is already authenticated and encrypted by Curve, so the warning is false."""
    import logging

    def not_that(record: logging.LogRecord) -> bool:
        return "Message signing is disabled" not in record.getMessage()

    from traitlets.log import get_logger  # (the kernel's own logger, inside a notebook)

    found = get_logger()
    logger = cast(logging.Logger, getattr(found, "logger", found))  # a LoggerAdapter's logger
    if remote:
        logger.addFilter(not_that)
    try:
        yield
    finally:
        logger.removeFilter(not_that)


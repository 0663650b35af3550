"""Dask distributed: ``dask scheduler`` plus one single-threaded ``dask worker`` per engine.

Workers run without a nanny (cloudlab's agent ties each worker to its owner)
and are named by engine id. The native client is created asynchronously on
cloudlab's loop; called from any other thread (a notebook cell) it behaves
as an ordinary synchronous ``distributed.Client``.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import cloudpickle

from ..backends.base import Command
from ..errors import StartError
from ..onhost.calls import Result, call, call_packed, execute_cell
from ..security import accept_only_this_user, dask_security, dask_tls
from .base import Answers, Engine, OutputSink, wait_for_file

OUTPUT_TOPIC = "cloudlab-output"
CLIENT_BATCH_SECONDS = 0.001
SCATTER_ABOVE = 1 << 20  # bytes of an all-engine call's pickled function and arguments
UNREGISTER_WITHIN = 2.0  # seconds: telling the scheduler that workers died
#: Dask's idle bookkeeping, slowed down: with its defaults (an event-loop tick every 20 ms, a
#: sampling profiler every 10 ms, ...) 16 idle workers keep half of a core busy (measured:
#: 52%; 5% with these). A user's own DASK_* variables win.
#: Dask serves HTTP (health, metrics) even without its dashboard, on every interface by
#: default (the scheduler on port 8787): keep it on loopback, on a free port.
LOOPBACK_HTTP = ("--no-dashboard", "--dashboard-address", "127.0.0.1:0")

QUIET = {
    "DASK_DISTRIBUTED__ADMIN__TICK__INTERVAL": "500ms",
    "DASK_DISTRIBUTED__WORKER__PROFILE__ENABLED": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__MONITOR_INTERVAL": "1s",
    "DASK_DISTRIBUTED__ADMIN__SYSTEM_MONITOR__INTERVAL": "2s",
}


class DaskEngine(Engine):
    name = "dask"
    short_name = "dask"
    mb_per_engine = 110
    # What a worker imports while it starts, and what cloudlab's tasks use there.
    preload = ("distributed.cli.dask_scheduler", "distributed.cli.dask_worker",
               "distributed.http.worker.prometheus", "cloudlab.onhost.calls", "numpy.random")
    client_modules = ("distributed",)
    notices_death_within = 2.0  # the scheduler sees the worker's connection close

    _client: Any = None

    def __init__(self, workdir, ip, task_retries: int = 2, remote: bool = False,
                 heartbeat_timeout: float = 10.0):
        super().__init__(workdir, ip, task_retries, remote, heartbeat_timeout)
        self._address: dict[int, str] = {}
        #: Each worker's last heartbeat as the scheduler stamped it, and when (on this
        #: client's clock) that stamp last changed: a silent worker's stamp stands still.
        self._heard: dict[str, tuple[float, float]] = {}
        # Dask authenticates nobody by itself. Between machines every party shows this
        # cluster's certificate; on one machine its servers accept only this user's
        # connections (see cloudlab.security).
        self.tls = dask_tls(workdir) if remote else None
        self._sinks: dict[str, tuple[OutputSink, set[int]]] = {}

    @property
    def scheduler_file(self):
        return self.workdir / "scheduler.json"

    def controller_command(self) -> Command:
        return Command(
            "scheduler",
            "cloudlab.engines.dask:scheduler_main",
            ("--host", self.ip, "--port", "0", "--scheduler-file", str(self.scheduler_file),
             *self._tls_args(), *LOOPBACK_HTTP, "--no-show"),
            # A task whose worker died is run again elsewhere, this many times.
            {**_quiet(), "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES": str(self.task_retries)},
            self.preload,
            spawn_if_cold=True,
            controller=True,
            writes=(self.scheduler_file,),
        )

    def engine_command(self, engine_id: int) -> Command:
        return Command(
            f"engine-{engine_id}",
            "cloudlab.engines.dask:worker_main",
            ("--scheduler-file", str(self.scheduler_file), "--name", str(engine_id),
             # On another host the worker listens on that host's own addresses (mutual TLS
             # admits only this cluster's certificate), and tells the scheduler the one
             # that routes to it.
             *(() if self.remote else ("--host", self.ip)), *self._tls_args(), "--no-nanny", "--nthreads", "1",
             *LOOPBACK_HTTP,
             "--local-directory", str(self.workdir / "dask"), "--death-timeout", "60"),
            {**_quiet(), "CLOUDLAB_ENGINE_ID": str(engine_id)},
            self.preload,
            files=(self.scheduler_file,
                   *((self.tls.ca, self.tls.cert, self.tls.key) if self.tls else ())),
        )

    def _tls_args(self) -> tuple[str, ...]:
        if self.tls is None:
            return ()
        return ("--protocol", "tls", "--tls-ca-file", str(self.tls.ca),
                "--tls-cert", str(self.tls.cert), "--tls-key", str(self.tls.key))

    async def connect(self, controller_alive: Callable[[], bool], timeout: float,
                      reach=None) -> None:
        from distributed import Client

        await wait_for_file(self.scheduler_file, controller_alive, timeout, "Dask scheduler")
        address = json.loads(self.scheduler_file.read_text())["address"]
        if reach is not None:  # (through a tunnel, say: TLS does not check the host name)
            scheme, _, rest = address.partition("://")
            host, _, port = rest.rpartition(":")
            (host, port), = await reach([(host.strip("[]"), int(port))])
            address = f"{scheme}://{host}:{port}"
        try:
            self._client = await Client(address,
                                        security=dask_security(self.tls) if self.tls else None,
                                        asynchronous=True, timeout=timeout)
        except Exception as e:
            raise StartError(f"Could not connect to the Dask scheduler: {e}") from e
        self._client.subscribe_topic(OUTPUT_TOPIC, self._on_output)
        # The client batches what it sends the scheduler for 10 ms, about one round trip:
        # whether a submit waits for that window or not made round trips flip between 10 and
        # 21 ms from one session to the next. 1 ms still batches a burst of submits.
        self._client.scheduler_comm.interval = CLIENT_BATCH_SECONDS

    @property
    def client(self):
        return self._client

    async def _workers(self) -> dict[str, dict]:
        info = await self._client.scheduler.identity(n_workers=-1)
        return info.get("workers", {})

    async def ready_ids(self) -> set[int]:
        if self._client is None:  # not connected (yet): nothing is usable
            return set()
        workers = await self._workers()
        self._address = {int(w["name"]): addr for addr, w in workers.items()}
        # The scheduler drops a silent worker only after worker-ttl (5 minutes), checked as
        # seldom: cloudlab stops counting it after heartbeat_timeout. (Stamps are compared
        # with each other, not with this clock: the scheduler may run on another machine.)
        now = time.monotonic()
        heard = self._heard
        for address, worker in workers.items():
            stamp = worker.get("last_seen", 0.0)
            if heard.get(address, (None,))[0] != stamp:
                heard[address] = (stamp, now)
        for address in set(heard) - set(workers):
            del heard[address]
        return {eid for eid, address in self._address.items()
                if now - heard[address][1] <= self.heartbeat_timeout}

    async def busy_ids(self) -> set[int]:
        processing = await self._client.processing()
        by_address = {a: i for i, a in self._address.items()}
        return {by_address[a] for a, keys in processing.items() if keys and a in by_address}

    async def submit(self, fn: Callable, *args: Any) -> Result:
        return await self._client.submit(call, fn, *args, pure=False)

    async def submit_to(self, engine_id: int, fn: Callable, *args: Any) -> Result:
        return await self._pinned(engine_id, call, fn, *args)

    async def _pinned(self, engine_id: int, fn: Callable, *args: Any) -> Any:
        """``fn(*args)`` as a task only engine ``engine_id`` may run."""
        future = self._client.submit(fn, *args, workers=[self._address[engine_id]],
                                     allow_other_workers=False, pure=False)
        try:
            return await future
        except asyncio.CancelledError:
            # Pinned to a worker that may be gone, it would wait for that worker forever.
            cancelling = future.cancel()  # a coroutine, with an asynchronous client
            if inspect.isawaitable(cancelling):
                asyncio.ensure_future(cancelling).add_done_callback(_ignore)
            raise

    async def run_each(self, ids: list[int], fn: Callable, *args: Any) -> Answers:
        # Pinned tasks, not Client.run: a long function must not block a worker's event
        # loop (and its heartbeats), and it should queue behind running work as on ipyparallel.
        # Pickled once; a large payload travels once (scatter, broadcast), not once per engine.
        packed = cloudpickle.dumps((fn, args))
        if len(packed) > SCATTER_ABOVE and ids:
            [packed] = await self._client.scatter([packed], broadcast=True, hash=False,
                                                  workers=[self._address[i] for i in ids])
        return {eid: asyncio.ensure_future(self._pinned(eid, call_packed, packed))
                for eid in ids}

    async def execute_each(self, code: str, ids: list[int], sink: OutputSink) -> Answers:
        token = uuid.uuid4().hex
        pending = set(ids)
        self._sinks[token] = (sink, pending)

        async def cell(eid: int) -> Result:
            try:
                result = await self._pinned(eid, execute_cell, code, OUTPUT_TOPIC, token)
                # Output events travel apart from results: wait for the engine's last one.
                for _ in range(100):
                    if eid not in pending:
                        break
                    await asyncio.sleep(0.02)
                return result
            finally:
                pending.discard(eid)
                if not pending:
                    self._sinks.pop(token, None)

        return {eid: asyncio.ensure_future(cell(eid)) for eid in ids}

    def _on_output(self, event) -> None:
        _, msg = event
        entry = self._sinks.get(msg.get("token"))
        if entry is None:
            return
        sink, pending = entry
        if msg.get("done"):
            pending.discard(msg["engine"])
        else:
            sink(msg["engine"], msg["stream"], msg["text"])

    async def gone(self, ids: list[int]) -> None:
        # The scheduler notices a killed worker's closed connection, but not a silent one's
        # (a frozen process, a cut link) before worker-ttl: it would send it tasks meanwhile.
        # All at once and bounded: a scheduler that is ending refuses connections, which
        # Dask retries for its whole connect timeout.
        addresses = [a for a in (self._address.pop(eid, None) for eid in ids) if a]
        if not addresses or self._client is None or self._client.status != "running":
            return
        stimulus = f"cloudlab-gone-{time.time()}"
        unregistering = [self._client.scheduler.unregister(address=a, stimulus_id=stimulus)
                         for a in addresses]
        try:
            await asyncio.wait_for(asyncio.gather(*unregistering, return_exceptions=True),
                                   UNREGISTER_WITHIN)
        except TimeoutError:  # the scheduler is gone too, or its worker-ttl does it
            pass

    async def forget(self, ids: list[int]) -> None:
        addresses = [self._address[i] for i in ids if i in self._address]
        if addresses:
            try:
                await self._client.retire_workers(addresses, close_workers=True)
            except Exception:  # already gone: the backend kills it anyway
                pass
        for i in ids:
            self._address.pop(i, None)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


class _CancelledReconnect(logging.Filter):
    """Drops distributed.client's report of a reconnect cancelled by our own close (after
    the scheduler went: `cloudlab stop` elsewhere), which it logs as an error with a
    traceback; the cluster says in one line why it ended."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError))


logging.getLogger("distributed.client").addFilter(_CancelledReconnect())


def _ignore(done: asyncio.Future) -> None:
    done.cancelled() or done.exception()


def _quiet() -> dict[str, str]:
    return {k: v for k, v in QUIET.items() if k not in os.environ}


def scheduler_main() -> None:
    """``dask scheduler``, with this process's Dask config and cloudlab's process title."""
    _prepare_process()
    from distributed.cli.dask_scheduler import main

    main()


def worker_main() -> None:
    """``dask worker``, with this process's Dask config and cloudlab's process title."""
    _prepare_process()
    from distributed.cli.dask_worker import main

    main()


def _prepare_process() -> None:
    # A forked process's Dask config was read when its fork server imported Dask: read it
    # again from this process's environment (DASK_* variables set since then).
    import dask.config

    dask.config.refresh()
    # Dask retitles its processes ("dask worker [tcp://...]"); cloudlab's title names the
    # cluster and engine, and `cloudlab stop` and the tests recognise processes by it.
    import distributed.proctitle

    distributed.proctitle.setproctitle_mod = None  # type: ignore[assignment]
    accept_only_this_user()  # plain TCP (on one machine): this user's processes only

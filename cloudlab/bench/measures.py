"""One measure of one subject, in a fresh process: ``python -m cloudlab.bench.measures SPEC``.

``SPEC`` is a JSON object (``kind``, ``subject``, sizes); the process prints one
line, ``{"bench": 1, ...spec, "values": {...}, "error": ...}``, and exits. A
fresh process per measure keeps runs from warming or slowing each other; the
client libraries are imported before any timer starts, so only the work is timed.

Subjects, each started the way its documentation shows:

- ``raw-ipp``: ``ipyparallel.Cluster(n=n)`` with its defaults; ``start_cluster_sync()``,
  ``connect_client_sync()``, then ``client.wait_for_engines``.
- ``raw-dask``: ``LocalCluster(n_workers=0, threads_per_worker=1, processes=True)``,
  ``Client(cluster)``, ``cluster.scale(n)``, then ``client.wait_for_workers``. Scaling
  from zero starts all n nannies at once, as ``LocalCluster(n_workers=n)`` does in
  its constructor (which blocks until all have started), but lets the first worker
  be timed too. Its dashboard stays at the default (it starts only where bokeh is
  installed, which cloudlab does not require; cloudlab starts none).
- ``cloudlab-ipp``, ``cloudlab-dask``: ``cloudlab.Cluster(n, engine=...)``; with
  ``variant: "warm"``, after ``cloudlab.prewarm(engine)`` has returned.
- ``numpy``: no cluster; the naive one-process NumPy pi the ``pi`` measure is compared to.

"Usable" means a trivial task came back: from one engine for the first-engine
time, from every engine for the all-engines time. Timers include building the
cluster object. Every result is checked (map output, pushed shape and sum on
each engine) so that work which did not happen cannot look fast.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import psutil

#: Processes that outlive a cluster on purpose (they hold no engine).
HELPERS = ("fork server", "forkserver", "resource_tracker")

CHECK = "_bench_check = (list(a.shape), float(a.sum()))"
#: Round trips timed in a row on one subject before the other subject's turn.
RTT_BLOCK = 10


def f(x):
    """The tiny task of every measure: so cheap that only the engine's overhead is timed."""
    return x + 1


#: The trivial task that proves an engine usable during a start: a builtin, so no
#: engine pays for importing this module (and cloudlab) inside the timer.
TRIVIAL, ARG, ANSWER = abs, -1, 1


class BenchError(RuntimeError):
    """A result that is wrong or missing: the measure must not count."""


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise BenchError(what)


def _pinned(client, workers, fn, *args) -> list:
    """Run ``fn(*args)`` once on each Dask worker in ``workers`` (not merely somewhere)."""
    futures = [client.submit(fn, *args, workers=[w], allow_other_workers=False, pure=False)
               for w in workers]
    return client.gather(futures)


# ---------------------------------------------------------------------- subjects
class RawIPyParallel:
    engine = "ipyparallel"

    def __init__(self, spec: dict):
        import ipyparallel

        self.ipp = ipyparallel
        self.cluster: Any = None
        self.client: Any = None

    def start(self, n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.cluster = self.ipp.Cluster(n=n)
        self.cluster.start_cluster_sync()
        self.client = self.cluster.connect_client_sync()
        self.client.wait_for_engines(1, interactive=False)
        self.view = self.client.load_balanced_view()
        _require(self.view.apply_sync(TRIVIAL, ARG) == ANSWER, "the first engine answered wrongly")
        first = time.perf_counter() - t0
        self.client.wait_for_engines(n, interactive=False)
        _require(self.client[:].apply_sync(TRIVIAL, ARG) == [ANSWER] * n,
                 f"not all {n} engines answered")
        return first, time.perf_counter() - t0

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.stop_cluster_sync()
        self.client = self.cluster = None

    def map(self, items: list) -> list:
        return self.view.map_sync(f, items)

    def round_trip(self):
        return self.view.apply_sync(f, 1)

    def push(self, array) -> None:
        self.client[:].push({"a": array}, block=True)

    def pushed(self) -> list:
        view = self.client[:]
        view.execute(CHECK, block=True)
        return view.pull("_bench_check", block=True)


class RawDask:
    engine = "dask"

    def __init__(self, spec: dict):
        import distributed

        self.distributed = distributed
        self.cluster: Any = None
        self.client: Any = None

    def start(self, n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.cluster = self.distributed.LocalCluster(n_workers=0, threads_per_worker=1,
                                                     processes=True)
        self.client = self.distributed.Client(self.cluster)
        self.cluster.scale(n)
        self.client.wait_for_workers(1)
        _require(self.client.submit(TRIVIAL, ARG, pure=False).result() == ANSWER,
                 "the first worker answered wrongly")
        first = time.perf_counter() - t0
        self.client.wait_for_workers(n)
        _require(_pinned(self.client, self._workers(), TRIVIAL, ARG) == [ANSWER] * n,
                 f"not all {n} workers answered")
        return first, time.perf_counter() - t0

    def _workers(self) -> list[str]:
        return sorted(self.client.scheduler_info(n_workers=-1)["workers"])

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()
        self.client = self.cluster = None

    def map(self, items: list) -> list:
        return self.client.gather(self.client.map(f, items))

    def round_trip(self):
        return self.client.submit(f, 1, pure=False).result()

    def push(self, array) -> None:
        self.future = self.client.scatter(array, broadcast=True)
        self.distributed.wait(self.future)

    def pushed(self) -> list:
        workers = self._workers()
        holders = set(self.client.who_has([self.future]).get(self.future.key, ()))
        _require(holders == set(workers),
                 f"the array is on {len(holders)} of {len(workers)} workers")
        return _pinned(self.client, workers, _shape_and_sum, self.future)


def _shape_and_sum(a) -> tuple[list, float]:
    return list(a.shape), float(a.sum())


class Cloudlab:
    def __init__(self, spec: dict):
        import cloudlab

        self.engine = "ipyparallel" if spec["subject"] == "cloudlab-ipp" else "dask"
        # The same client libraries are imported before the timer as for the raw engines.
        importlib.import_module(self.engine if self.engine != "dask" else "distributed")
        importlib.import_module(f"cloudlab.engines.{'ipp' if self.engine != 'dask' else 'dask'}")
        self.cloudlab = cloudlab
        self.c: Any = None
        if spec.get("variant") == "warm":  # as after %load_ext cloudlab: the fork server is up
            cloudlab.prewarm(self.engine).result()

    def start(self, n: int) -> tuple[float, float]:
        t0 = time.perf_counter()
        self.c = self.cloudlab.Cluster(n, engine=self.engine)
        self.c.start(min_engines=1)
        _require(self.c.submit(TRIVIAL, ARG).result() == ANSWER, "the first engine answered wrongly")
        first = time.perf_counter() - t0
        self.c.wait_for_engines()
        _require(list(self.c.run(TRIVIAL, ARG).values()) == [ANSWER] * n,
                 f"not all {n} engines answered")
        return first, time.perf_counter() - t0

    def stop(self) -> None:
        if self.c is not None:
            self.c.stop()
        self.c = None

    def map(self, items: list) -> list:
        return self.c.map(f, items)

    def round_trip(self):
        return self.c.submit(f, 1).result()

    def push(self, array) -> None:
        self.c.push(a=array)

    def pushed(self) -> list:
        self.c.execute(CHECK)
        return list(self.c.pull("_bench_check").values())


SUBJECTS: dict[str, type[RawIPyParallel | RawDask | Cloudlab]] = {
    "raw-ipp": RawIPyParallel, "raw-dask": RawDask,
    "cloudlab-ipp": Cloudlab, "cloudlab-dask": Cloudlab}


# ---------------------------------------------------------------------- measures
def _descendants() -> list[psutil.Process]:
    alive = []
    for p in psutil.Process().children(recursive=True):
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.Error:
            pass
    return alive


def _describe(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:120] or p.name()
    except psutil.Error:
        return "(gone)"


def measure_start(subject, spec: dict) -> dict:
    """Start n engines (first usable, all usable), then stop them and count what is left."""
    before = {p.pid for p in _descendants()}
    first, everything = subject.start(spec["n"])
    t0 = time.perf_counter()
    subject.stop()
    stop = time.perf_counter() - t0
    new = [p for p in _descendants() if p.pid not in before]
    left = [d for d in map(_describe, new) if not any(h in d for h in HELPERS)]
    values = {"first": first, "start": everything, "stop": stop, "left": len(left),
              "left_processes": left}
    if isinstance(subject, Cloudlab) and not spec.get("variant"):
        values["import"] = engine_import_seconds(subject.engine)
    return values


def engine_import_seconds(engine: str) -> float:
    """How long a fresh Python takes to import what an engine needs: the floor under any
    cold start, which no process can start an engine without paying."""
    import subprocess

    from cloudlab.plugins import engine_class

    modules = engine_class(engine).preload
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {', '.join(modules)}"], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def measure_map(subject, spec: dict) -> dict:
    subject.start(spec["engines"])
    subject.map(list(range(4 * spec["engines"])))  # warm-up: engines import this module
    items = list(range(spec["items"]))
    t0 = time.perf_counter()
    out = subject.map(items)
    seconds = time.perf_counter() - t0
    _require(list(out) == [x + 1 for x in items], "map returned wrong results")
    return {"items_per_s": len(items) / seconds, "items": len(items), "seconds": seconds}


def measure_rtt(subject, spec: dict, raw=None) -> dict:
    """Median round trip of a tiny submit. With ``raw`` (the raw engine, started in this
    same process), both are timed in turn, in blocks of ``RTT_BLOCK``, so that the
    machine's drift (round trips here move by half from one minute to the next) falls on
    both alike; the raw engine's median is returned as ``raw_rtt``."""
    subjects = [subject] if raw is None else [subject, raw]
    for s in subjects:
        s.start(spec["engines"])
        for _ in range(spec["warmup"]):
            s.round_trip()
    times: dict[int, list[float]] = {id(s): [] for s in subjects}
    blocks = max(1, spec["count"] // RTT_BLOCK)
    for block in range(blocks):
        for s in subjects if block % 2 == 0 else subjects[::-1]:
            for _ in range(RTT_BLOCK):
                t0 = time.perf_counter()
                value = s.round_trip()
                times[id(s)].append(time.perf_counter() - t0)
                _require(value == 2, "a round trip returned a wrong result")
    ours = times[id(subject)]
    result = {"rtt": statistics.median(ours), "count": len(ours), "min": min(ours)}
    if raw is not None:
        result["raw_rtt"] = statistics.median(times[id(raw)])
    return result


def measure_push(subject, spec: dict) -> dict:
    import numpy as np

    n = spec["engines"]
    subject.start(n)
    subject.push(np.zeros(1))  # warm-up: engines unpickle NumPy arrays from now on
    array = np.random.default_rng(0).random(int(spec["mb"] * 1e6) // 8)
    expected = float(array.sum())
    t0 = time.perf_counter()
    subject.push(array)
    seconds = time.perf_counter() - t0
    found = subject.pushed()
    _require(len(found) == n, f"the array reached {len(found)} of {n} engines")
    for shape, total in found:
        _require(list(shape) == [array.size] and math.isclose(total, expected, rel_tol=1e-9),
                 f"an engine holds shape {shape} sum {total}, not {[array.size]} {expected}")
    return {"push": seconds, "mb": array.nbytes / 1e6, "engines": n}


def measure_pi(subject, spec: dict) -> dict:
    """Samples/s on 2 engines and on 1, alternately (``pairs`` times each, one cluster
    scaled between them), so that a machine whose speed drifts during the measure moves
    both figures alike; efficiency is the ratio of their medians.

    Each cloudlab run is followed by the same count in bare processes (a process pool, no
    cluster): the machine's own efficiency at that moment. On a virtual machine whose two
    vCPUs the hypervisor sometimes places on one physical core's two hyperthreads, 2
    processes of this vector-bound kernel count only about as fast as 1; the bare runs
    show when that happened."""
    from cloudlab.workloads import pi

    with _bare_pool() as pool:
        subject.start(2)
        rates: dict[int, list[float]] = {2: [], 1: []}
        bare: dict[int, list[float]] = {2: [], 1: []}
        cpu: list[dict] = []
        for _ in range(spec.get("pairs", 1)):
            for engines in (2, 1):
                if engines != len(subject.c.engine_ids):
                    subject.c.scale(engines)
                pi.warm_up()
                subject.c.run(pi.warm_up)  # so that the CPU counted below is the timed count's
                before = _cpu_snapshot()
                result = pi.estimate(subject.c, spec["samples"])
                cpu.append({"engines": engines, **_cpu_spent(before, result.seconds)})
                _require(result.engines == engines,
                         f"pi ran on {result.engines} engines, not {engines}")
                _require(abs(result.estimate - math.pi) < 6 * result.stderr + 1e-6,
                         f"pi came out as {result.estimate}")
                rates[engines].append(result.samples_per_s)
                inside, seconds = _bare_count(pool, spec["samples"], engines)
                _require(inside == result.inside, "bare processes counted other points")
                bare[engines].append(spec["samples"] / seconds)
    rate1, rate2 = statistics.median(rates[1]), statistics.median(rates[2])
    bare1, bare2 = statistics.median(bare[1]), statistics.median(bare[2])
    return {"rate1": rate1, "rate2": rate2, "efficiency": rate2 / (2 * rate1),
            "rates1": rates[1], "rates2": rates[2], "cpu": cpu,
            "bare_efficiency": bare2 / (2 * bare1), "bare_rates1": bare[1],
            "bare_rates2": bare[2]}


def _bare_pool():
    """Two fresh processes with the pi kernel loaded: the control of ``measure_pi``."""
    import concurrent.futures
    import multiprocessing

    pool = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"))
    for done in [pool.submit(_warm_and_linger) for _ in range(2)]:
        done.result()
    return pool


def _warm_and_linger() -> None:
    """Load the kernel, then stay busy a moment so that the other worker takes the other call."""
    from cloudlab.workloads import pi

    pi.warm_up()
    time.sleep(0.5)


def _bare_count(pool, samples: float, processes: int) -> tuple[int, float]:
    from cloudlab.workloads import pi

    samples = int(samples)
    key = pi.seed_key(0)
    bounds = [samples * k // processes for k in range(processes + 1)]
    t0 = time.perf_counter()
    inside = sum(pool.map(pi._count_task, [(key, a, b, "cpu") for a, b in zip(bounds, bounds[1:])]))
    return inside, time.perf_counter() - t0


def _cpu_snapshot() -> tuple[float, float, dict[int, float]]:
    """Busy CPU seconds of the whole machine, its steal, and each process of this
    measure (this one and its descendants: fork server, engines)."""
    mine = {}
    for p in [psutil.Process(), *_descendants()]:
        try:
            t = p.cpu_times()
            mine[p.pid] = t.user + t.system
        except psutil.Error:
            pass
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + t.steal, t.steal, mine


def _cpu_spent(before, seconds: float) -> dict:
    """Where the CPU went during a timed run: to this measure's processes (per process, as
    a fraction of the run), to the hypervisor (steal), to anything else on the machine. A
    slow run with CPU left to others was crowded out; one whose engines idled was not fed."""
    busy0, steal0, mine0 = before
    busy1, steal1, mine1 = _cpu_snapshot()
    ours = {pid: mine1[pid] - mine0.get(pid, 0.0) for pid in mine1}
    return {"busy": (busy1 - busy0) / seconds, "steal": (steal1 - steal0) / seconds,
            "others": (busy1 - busy0 - sum(ours.values())) / seconds,
            "ours": sorted((round(v / seconds, 3) for v in ours.values() if v > 0.01 * seconds),
                           reverse=True),
            "names": {pid: _describe(psutil.Process(pid))[:40] for pid, v in ours.items() if v > 0.01 * seconds}}


def numpy_pi(spec: dict) -> dict:
    """The naive baseline: float64 coordinates, 1e7 at a time, in this one process."""
    import numpy as np

    rng = np.random.default_rng(0)
    samples, chunk, inside = int(spec["samples"]), 10_000_000, 0
    t0 = time.perf_counter()
    for start in range(0, samples, chunk):
        m = min(chunk, samples - start)
        x, y = rng.random(m), rng.random(m)
        inside += int(np.count_nonzero(x * x + y * y < 1.0))
    seconds = time.perf_counter() - t0
    _require(abs(4 * inside / samples - math.pi) < 0.01, "NumPy pi is wrong")
    return {"rate": samples / seconds, "engines": 1}


MEASURES: dict[str, Callable[..., dict]] = {
    "start": measure_start, "start2": measure_start, "map": measure_map,
    "rtt": measure_rtt, "push": measure_push, "pi": measure_pi}


def measure(spec: dict) -> dict:
    """Run the measure ``spec`` names; the clusters are stopped whatever happens."""
    if spec["subject"] == "numpy":
        return numpy_pi(spec)
    subject = SUBJECTS[spec["subject"]](spec)
    paired = SUBJECTS[spec["paired_with"]](spec) if spec.get("paired_with") else None
    try:
        if paired is not None:
            return MEASURES[spec["kind"]](subject, spec, raw=paired)
        return MEASURES[spec["kind"]](subject, spec)
    finally:
        for s in (subject, paired):
            try:
                if s is not None:
                    s.stop()
            except Exception:
                pass


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((sys.argv[1:] if argv is None else argv)[0])
    result = {"bench": 1, **spec, "pid": os.getpid(), "values": {}, "error": None}
    try:
        result["values"] = measure(spec)
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}".strip()[:500]
    print(json.dumps(result), flush=True)
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    # Run through the package's name, so `f` pickles as cloudlab.bench.measures.f
    # (importable on every engine), not as __main__.f.
    from cloudlab.bench.measures import main as _main

    sys.exit(_main())

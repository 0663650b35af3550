"""``cloudlab bench``: cloudlab against the raw ipyparallel and Dask it wraps, in one run.

>>> from cloudlab import bench
>>> report = bench.run(quick=True, only=["rtt", "map"])   # doctest: +SKIP
>>> print(report); report.regressions                       # doctest: +SKIP

Four subjects (raw ipyparallel, raw Dask, cloudlab on each) take every measure
side by side, interleaved (for each repetition, for each measure, for each
subject), so a machine that slows down during the run slows all of them. Each
(subject, measure, repetition) runs in a fresh process (:mod:`.measures`) under
a timeout; everything it started carries a tag in its environment, and is
killed if it outlives that process. :mod:`.report` turns the results into
medians, ratios, targets and regressions; a run fails only when cloudlab is
slower than the raw engine it wraps, never on absolute times.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from .report import (
    COLD_START_NOISE,
    HIGHER,
    LOWER,
    RTT_ALLOWANCE,
    RTT_NOISE,
    Report,
    Row,
    Target,
    write_chart,
)

__all__ = ["run", "Report", "Row", "Target", "Sizes", "FULL", "QUICK", "MEASURES"]

#: Environment variable that marks every process of one measuring run.
TAG = "CLOUDLAB_BENCH_RUN"


@dataclass(frozen=True)
class Sizes:
    """How big each measure is, how often it repeats, how long one run may take."""

    start_n: int = 16
    map_engines: int = 4
    map_items: int = 100_000  # cloudlab: chunked automatically
    map_items_raw: int = 2_000  # raw engines: one task per item, ~400-800 items/s
    rtt_engines: int = 2
    rtt_warmup: int = 20
    rtt_count: int = 200
    push_mb: float = 100
    push_engines: int = 16
    pi_samples: float = 8e9
    pi_pairs: int = 3  # alternating runs on 2 and on 1 engine, per repetition
    numpy_samples: float = 1e8
    reps: int = 3
    timeout: float = 240


FULL = Sizes()
#: Quick: the large start is 2 engines, so start16 and start2 become one measure (each
#: raw ipyparallel start costs 7-8 s of its 3 s heartbeat, and the run must stay under 2 min).
QUICK = Sizes(start_n=2, map_items=20_000, map_items_raw=500, rtt_warmup=10, rtt_count=50,
              push_mb=20, push_engines=4, pi_samples=4e9, pi_pairs=1, numpy_samples=2e7, reps=1,
              timeout=90)

#: Measure names for ``only``: each runs one kind of measuring process.
MEASURES = {
    "start": "start", "first": "start", "stop": "start",
    "start16": "start", "first16": "start", "stop16": "start",
    "start4": "start", "first4": "start", "stop4": "start",
    "start2": "start2", "map": "map", "rtt": "rtt", "submit_rtt": "rtt",
    "push": "push", "pi": "pi",
}
KINDS = ["start", "start2", "map", "rtt", "push", "pi"]
ENGINES = {"ipyparallel": ("raw-ipp", "cloudlab-ipp"), "dask": ("raw-dask", "cloudlab-dask")}


def run(quick: bool = False, reps: int | None = None, only: Iterable[str] | str | None = None,
        out: str | os.PathLike | None = None,
        log: Callable[[str], None] | None = None) -> Report:
    """Measure, compare, and (with ``out``) write ``bench.json`` and ``bench.png`` there.

    ``only`` picks measures by name (``"rtt,map"`` or a list; see :data:`MEASURES`);
    ``log`` (``print``, say) receives one line per measuring process as it finishes.
    """
    sizes = QUICK if quick else FULL
    reps = sizes.reps if reps is None else int(reps)
    if reps < 1:
        raise ValueError(f"reps must be at least 1, not {reps}.")
    kinds = choose_kinds(only, sizes)
    plan = [spec for kind in kinds for spec in specs(kind, sizes)]
    t0 = time.monotonic()
    runs = []
    for rep in range(reps):
        for spec in plan:
            result = run_one({**spec, "rep": rep}, sizes.timeout)
            runs.append(result)
            if log is not None:
                log(f"[{len(runs)}/{len(plan) * reps}] {_summary(result)}")
    mode = "quick" if quick else "full"
    rows = build_rows(runs, sizes, mode)
    report = Report(rows=rows, machine=machine(), mode=mode, reps=reps, sizes=asdict(sizes),
                    runs=runs, seconds=time.monotonic() - t0, notes=notes(rows, sizes, mode))
    if out is not None:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        report.files = {"json": str(folder / "bench.json"), "png": str(folder / "bench.png")}
        write_chart(report, report.files["png"])
        Path(report.files["json"]).write_text(report.to_json())
    return report


def choose_kinds(only: Iterable[str] | str | None, sizes: Sizes = FULL) -> list[str]:
    """The kinds of measuring process that the measures named in ``only`` need, in run order."""
    if sizes.start_n == 2:  # the large start is the small one: run it once
        return list(dict.fromkeys("start" if k == "start2" else k for k in choose_kinds(only)))
    if only is None:
        return list(KINDS)
    names = only.split(",") if isinstance(only, str) else list(only)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in MEASURES]
    if unknown or not names:
        raise ValueError(f"Unknown measure {', '.join(map(repr, unknown)) or '(none given)'}; "
                         f"choose from {', '.join(MEASURES)}.")
    chosen = {MEASURES[n] for n in names}
    return [k for k in KINDS if k in chosen]


def specs(kind: str, sizes: Sizes) -> list[dict]:
    """The measuring processes of one measure, one repetition, in the order they run."""
    if kind == "pi":
        out = [{"kind": kind, "subject": "numpy", "samples": sizes.numpy_samples}]
        return out + [{"kind": kind, "subject": cloudlab, "samples": sizes.pi_samples,
                       "pairs": sizes.pi_pairs} for _, cloudlab in ENGINES.values()]
    if kind == "rtt":  # raw and cloudlab in one process, in turn: see measures.measure_rtt
        return [{"kind": kind, "subject": cloudlab, "paired_with": raw,
                 "engines": sizes.rtt_engines, "warmup": sizes.rtt_warmup,
                 "count": sizes.rtt_count} for raw, cloudlab in ENGINES.values()]
    out = []
    for raw, cloudlab in ENGINES.values():
        for subject in (raw, cloudlab):
            spec: dict[str, object] = {"kind": kind, "subject": subject}
            if kind in ("start", "start2"):
                spec["n"] = sizes.start_n if kind == "start" else 2
            elif kind == "map":
                spec.update(engines=sizes.map_engines,
                            items=sizes.map_items if subject == cloudlab else sizes.map_items_raw)
            elif kind == "push":
                spec.update(engines=sizes.push_engines, mb=sizes.push_mb)
            out.append(spec)
            if subject == cloudlab and kind in ("start", "start2"):
                out.append({**spec, "variant": "warm"})
    return out


# ------------------------------------------------------------- measuring processes
def run_one(spec: dict, timeout: float) -> dict:
    """Run one measuring process; kill it (and all it started) if it outlives ``timeout``."""
    tag = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="cloudlab-bench-") as tmp:
        # A private IPython directory: raw ipyparallel writes its profile and connection files.
        env = {**os.environ, TAG: tag, "IPYTHONDIR": str(Path(tmp, "ipython")),
               "MPLBACKEND": "Agg"}
        stdout, stderr = Path(tmp, "stdout"), Path(tmp, "stderr")
        t0 = time.monotonic()
        with open(stdout, "wb") as out, open(stderr, "wb") as err:
            # Files, not pipes: an engine that inherits them cannot keep us waiting.
            proc = subprocess.Popen([sys.executable, "-m", "cloudlab.bench.measures",
                                     json.dumps(spec)], stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=err, env=env, start_new_session=True)
        timed_out = False
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
        except BaseException:  # interrupted (Ctrl-C): nothing of the run may outlive us
            _kill_group(proc.pid)
            proc.wait()
            sweep(tag, grace=0)
            raise
        if timed_out:
            _kill_group(proc.pid)
            proc.wait()
        leaked = sweep(tag, grace=0 if timed_out else 5)
        result = _parse(stdout.read_text(errors="replace"))
        if result is None:
            tail = stderr.read_text(errors="replace").strip().splitlines()[-3:]
            cause = (f"timed out after {timeout:g} s" if timed_out else
                     f"exited with code {proc.returncode} without a result")
            result = {**spec, "values": {}, "error": cause + (": " + " | ".join(tail)
                                                              if tail else "")}
    result["wall_s"] = time.monotonic() - t0
    result["leaked"] = leaked
    return result


def _parse(stdout: str) -> dict | None:
    for line in reversed(stdout.splitlines()):
        if line.startswith('{"bench"'):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                return None
    return None


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def tagged(tag: str) -> list[psutil.Process]:
    """Live processes that carry ``tag`` (every process a measuring run started)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG) == tag and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def sweep(tag: str, grace: float = 5.0) -> list[str]:
    """Wait ``grace`` seconds for the run's processes to end, kill the rest; what was killed.

    Engines that watch their owner go within a moment of it; anything still there
    after the grace period has leaked, and is named in the result.
    """
    deadline = time.monotonic() + grace
    left = tagged(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = tagged(tag)
    names = []
    for proc in left:
        try:
            names.append(" ".join(proc.cmdline())[:120] or proc.name())
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    names += [f"(could not kill) pid {p.pid}" for p in tagged(tag)]
    return names


def _summary(result: dict) -> str:
    head = f"rep {result.get('rep', 0) + 1} {result['kind']:<6} {result['subject']}"
    if result.get("variant"):
        head += f" ({result['variant']})"
    if result.get("error"):
        return f"{head}: {result['error']}"
    shown = {k: v for k, v in result["values"].items() if isinstance(v, int | float)}
    return head + ": " + ", ".join(f"{k} {v:.4g}" for k, v in shown.items())


# --------------------------------------------------------------------------- rows
def _values(runs: list[dict], key: str, **match) -> tuple[list[float], list[str]]:
    """``values[key]`` of the runs matching ``match``, and the errors of those that failed."""
    chosen = [r for r in runs if all(r.get(k, "") == v for k, v in match.items())]
    values = [r["values"][key] for r in chosen if not r.get("error") and key in r["values"]]
    return values, [r["error"] for r in chosen if r.get("error")]


def build_rows(runs: list[dict], sizes: Sizes, mode: str) -> list[Row]:
    """Rows of the report, for the measures that ran (see :mod:`.report` for the rules)."""
    rows = []

    def add(measure, engine, kind, key, unit, better, target=None, variant="", limit=1.0,
            scale=1.0, raw_key=None, **match):
        raw_subject, cloudlab_subject = ENGINES[engine]
        if raw_key:  # measured in cloudlab's process, beside it
            raw, raw_errors = _values(runs, raw_key, kind=kind, subject=cloudlab_subject)
        else:
            raw, raw_errors = _values(runs, key, kind=kind, subject=raw_subject, variant="",
                                      **match)
        ours, errors = _values(runs, key, kind=kind, subject=cloudlab_subject, variant=variant,
                               **match)
        if raw or ours or raw_errors or errors:
            rows.append(Row(measure, engine, unit, better, [v * scale for v in raw],
                            [v * scale for v in ours], variant, "raw", target, limit,
                            errors + ([] if raw_key else raw_errors), paired=bool(raw_key)))

    n = sizes.start_n
    for engine in ENGINES:
        # The start targets are for `%cluster start`, which follows `%load_ext cloudlab`:
        # the warm rows. A cold start is only compared with the raw engine's; the
        # "import" row shows the part of it that no fresh process can avoid.
        for variant in ("", "warm"):
            warm = variant == "warm"
            limit = 1.0 if warm else COLD_START_NOISE[mode]
            add(f"start{n}", engine, "start", "start", "s", LOWER,
                Target("<=", 0.5 if n <= 2 else 1.5) if warm else None, variant, limit)
            add(f"first{n}", engine, "start", "first", "s", LOWER,
                Target("<=", 0.5) if warm else None, variant, limit)
            add("start2", engine, "start2", "start", "s", LOWER,
                Target("<=", 0.5) if warm else None, variant, limit)
        _, cloudlab_subject = ENGINES[engine]
        floor, _ = _values(runs, "import", kind="start", subject=cloudlab_subject, variant="")
        if floor:
            rows.append(Row("import", engine, "s", LOWER, [], floor, limit=None))
        add(f"stop{n}", engine, "start", "stop", "s", LOWER, Target("<=", 0.5))
        add(f"stop{n} left", engine, "start", "left", "procs", LOWER, Target("<=", 0), limit=None)
        add("map", engine, "map", "items_per_s", "items/s", HIGHER, Target(">=", 50_000))
        add("rtt", engine, "rtt", "rtt", "ms", LOWER, Target("<=", RTT_ALLOWANCE, relative=True),
            limit=RTT_ALLOWANCE * RTT_NOISE[mode], scale=1e3, raw_key="raw_rtt")
        add(f"push {sizes.push_mb:g}MB x{sizes.push_engines}", engine, "push", "push", "s",
            LOWER, Target("<=", 0.3))
    rows.sort(key=lambda r: _order(r.measure, n))
    rows += _pi_rows(runs)
    return rows


def _order(measure: str, n: int) -> int:
    names = [f"start{n}", f"first{n}", "start2", "import", "map", "rtt", "push", f"stop{n}"]
    return next((i for i, name in enumerate(names)
                 if measure == name or measure.startswith(name + " ")), len(names))


def _pi_rows(runs: list[dict]) -> list[Row]:
    """pi per core against naive NumPy in one process; efficiency of 2 engines over 1."""
    baseline, base_errors = _values(runs, "rate", kind="pi", subject="numpy")
    rows = []
    for engine, (_, cloudlab_subject) in ENGINES.items():
        one, errors = _values(runs, "rate1", kind="pi", subject=cloudlab_subject)
        efficiency, _ = _values(runs, "efficiency", kind="pi", subject=cloudlab_subject)
        if not (one or errors):
            continue
        rows.append(Row("pi per core", engine, "G/s", HIGHER, [v / 1e9 for v in baseline],
                        [v / 1e9 for v in one], raw_label="numpy", target=Target(">=", 3.0),
                        errors=errors + base_errors))
        bare, _ = _values(runs, "bare_efficiency", kind="pi", subject=cloudlab_subject)
        rows.append(Row("pi efficiency", engine, "%", HIGHER, [100 * v for v in bare],
                        [100 * v for v in efficiency], raw_label="processes",
                        target=Target(">=", 90), limit=None, errors=errors))
    return rows


def notes(rows: list[Row], sizes: Sizes, mode: str) -> list[str]:
    """What the subjects and measures of ``rows`` were, for the reader of the table."""
    measures = {r.measure for r in rows}
    out = [] if mode == "full" else [
        f"quick: smaller sizes than the targets were set for (which a smaller run should meet "
        f"all the more); the large start is {sizes.start_n} engines."]
    out += ["raw ipyparallel: ipyparallel.Cluster(n=...) defaults, start_cluster_sync, "
           "connect_client_sync, wait_for_engines; raw Dask: LocalCluster(n_workers=0, "
           "threads_per_worker=1, processes=True) + Client, scale(n), wait_for_workers."]
    n = sizes.start_n
    if measures & {f"start{n}", f"first{n}", "start2"}:
        out.append(f"start{n}{'' if n == 2 else '/start2'}: from building the cluster object until a trivial task "
                   f"came back from every engine; first{n}: from one engine.")
    if f"stop{n}" in measures:
        out.append(f"stop{n}: stopping the {n}-engine cluster just started; 'left': its "
                   f"engine and worker processes still alive when stop returned.")
    if any(r.variant for r in rows):
        out.append("warm: cloudlab after cloudlab.prewarm(engine) (what %load_ext cloudlab "
                   "does, so what `%cluster start` meets; the start targets are for it), "
                   "against the raw engine's cold start. Without 'warm': a fresh process, "
                   "cloudlab's fork server not yet started; compared with the raw engine only"
                   + (f", a regression beyond x {COLD_START_NOISE[mode]:g} (the spread of "
                      "fresh interpreters' imports between runs)" if COLD_START_NOISE[mode] != 1 else "")
                   + "; import: a fresh Python importing what an engine needs, which any "
                   "cold start pays.")
    if "map" in measures:
        out.append(f"map: raw engines one task per item over {sizes.map_items_raw:,} items; "
                   f"cloudlab c.map over {sizes.map_items:,} items, chunked; "
                   f"{sizes.map_engines} engines.")
    if "rtt" in measures:
        out.append(f"rtt: median of {sizes.rtt_count} round trips on {sizes.rtt_engines} "
                   f"engines, raw and cloudlab in one process, in turns of 10; a regression "
                   f"beyond raw x {RTT_ALLOWANCE:g} (target) x {RTT_NOISE[mode]:g} (noise of "
                   f"one {mode} run).")
    if any(m.startswith("push") for m in measures):
        out.append("push: one float64 array into every engine, then checked there "
                   "(shape and sum).")
    if "pi per core" in measures:
        out.append(f"pi: {sizes.pi_samples:.0e} samples on 2 engines, then on 1, "
                   f"{sizes.pi_pairs} time{'s' if sizes.pi_pairs > 1 else ''} in turn (per "
                   f"core: the median on 1; efficiency = median rate(2) / (2 x median "
                   f"rate(1))); numpy = naive float64 pi in one process, "
                   f"{sizes.numpy_samples:.0e} samples.")
    return out


def machine() -> dict:
    import distributed
    import ipyparallel
    import numpy

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "ipyparallel": ipyparallel.__version__, "distributed": distributed.__version__,
            "numpy": numpy.__version__, "platform": platform.platform(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}

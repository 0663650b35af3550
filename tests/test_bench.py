"""`cloudlab bench`: the verdict logic on made-up numbers, then one small real run."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from cloudlab import bench
from cloudlab.bench.report import HIGHER, LOWER, Report, Row, Target, format_table, write_chart
from conftest import ROOT, wait_until_gone


def row(raw, cloudlab, better=LOWER, **kw) -> Row:
    return Row(kw.pop("measure", "start16"), kw.pop("engine", "dask"),
               kw.pop("unit", "s" if better == LOWER else "items/s"), better, raw, cloudlab, **kw)


# ------------------------------------------------------------------ verdicts
def test_medians_of_odd_and_even_counts():
    r = row([3.0, 1.0, 2.0], [4.0, 1.0, 3.0, 2.0])
    assert r.raw_median == 2.0
    assert r.cloudlab_median == 2.5
    assert row([], []).raw_median is None


def test_slower_cloudlab_is_a_regression_and_faster_is_not():
    assert row([1.0], [1.2]).regression  # seconds: more is slower
    assert row([1.0], [0.2]).regression is None
    assert row([1.0], [1.0]).regression is None  # equal is not slower
    assert row([500.0], [400.0], HIGHER).regression  # items/s: less is slower
    assert row([500.0], [90_000.0], HIGHER).regression is None


def test_ratio_and_speedup_read_the_same_way_for_both_units():
    seconds, rate = row([2.0], [0.5]), row([100.0], [400.0], HIGHER)
    assert seconds.ratio == 0.25 and seconds.speedup == 4
    assert rate.ratio == 4 and rate.speedup == 4


def test_rtt_may_cost_its_allowance_before_it_regresses():
    limit = bench.RTT_ALLOWANCE * bench.RTT_NOISE["quick"]
    assert row([10.0], [10.0 * limit * 0.99], limit=limit).regression is None
    assert row([10.0], [10.0 * limit * 1.01], limit=limit).regression


def test_a_cloudlab_failure_regresses_only_where_the_raw_engine_gave_a_number():
    failed = row([1.0], [], errors=["StartError: boom"])
    assert "gave no number" in failed.regression and "boom" in failed.regression
    assert row([], [1.0], errors=["raw timed out"]).regression is None
    assert row([], [], errors=["both failed"]).regression is None
    # Raw and cloudlab timed in cloudlab's one process: its crash is cloudlab's.
    assert "gave no number" in row([], [], errors=["Boom"], paired=True).regression


def test_rows_without_comparison_never_regress():
    assert row([0.0], [3.0], unit="procs", limit=None).regression is None
    assert row([], [50.0], HIGHER, unit="%", limit=None).regression is None


def test_targets_met_and_not_met():
    assert row([9.0], [1.2], target=Target("<=", 1.5)).met is True
    assert row([9.0], [1.6], target=Target("<=", 1.5)).met is False
    assert row([500.0], [60_000.0], HIGHER, target=Target(">=", 50_000)).met is True
    assert row([500.0], [40_000.0], HIGHER, target=Target(">=", 50_000)).met is False
    relative = Target("<=", 1.10, relative=True)
    assert row([10.0], [10.9], target=relative).met is True
    assert row([10.0], [11.5], target=relative).met is False
    assert row([], [11.5], target=relative).met is None  # nothing to be relative to
    assert row([1.0], []).met is None


def report_of(rows: list[Row]) -> Report:
    machine = {"cores": 2, "cpu": "Test CPU", "python": "3.11", "ipyparallel": "9",
               "distributed": "2026", "numpy": "2", "date": "2026-01-01"}
    return Report(rows=rows, machine=machine, mode="quick", reps=1, sizes={},
                  notes=["a note"])


def test_table_is_aligned_and_names_machine_regressions_and_unmet_targets():
    rows = [row([9.6], [1.2], target=Target("<=", 1.5), engine="ipyparallel"),
            row([0.4], [0.6], target=Target("<=", 0.5), measure="start2"),
            row([500.0], [90_000.0], HIGHER, measure="map", target=Target(">=", 50_000))]
    text = format_table(report_of(rows))
    assert "2 cores" in text and "Test CPU" in text and "ipyparallel 9" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("measure"))
    for column in ("engine", "unit", "cloudlab/raw", "target", "met"):
        at = lines[header].index(column)  # left-aligned: every cell starts under its name
        assert all(line[at - 2:at] == "  " and line[at] != " "
                   for line in lines[header + 1:header + 4]), column
    assert "8.0x faster" in text and "1.5x slower" in text and "180x faster" in text
    assert "REGRESSIONS (1)" in text and "start2 on dask" in text
    assert "NOT MET" in text and "a note" in text
    assert "No regression" in format_table(report_of(rows[:1]))


def test_json_carries_rows_verdicts_and_regressions():
    report = report_of([row([1.0], [2.0]), row([2.0], [1.0], engine="ipyparallel")])
    data = json.loads(report.to_json())
    assert data["regressions"] == report.regressions and len(data["regressions"]) == 1
    first = data["rows"][0]
    assert first["raw_median"] == 1.0 and first["cloudlab_median"] == 2.0
    assert first["ratio"] == 2.0 and first["regression"]


def test_chart_is_a_png_even_with_a_missing_bar(tmp_path):
    from matplotlib.image import imread

    rows = [row([9.6, 9.0], [1.2, 1.0], target=Target("<=", 1.5)),
            row([9.6], [0.3], measure="start16", variant="warm"),
            row([300.0], [80_000.0], HIGHER, measure="map"),
            row([1.0], [], measure="push", errors=["failed"]),
            row([0.0], [0.0], measure="stop16 left", unit="procs", limit=None)]
    path = tmp_path / "bench.png"
    write_chart(report_of(rows), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert imread(path).shape[0] > 200


def test_rows_from_results_medians_warm_rows_and_pi_efficiency():
    def result(kind, subject, values, **spec):
        return {"kind": kind, "subject": subject, "values": values, "error": None, **spec}

    runs = []
    for rep, (raw, ours) in enumerate([(9.0, 1.0), (11.0, 1.4), (10.0, 1.2)]):
        runs += [result("start", "raw-ipp", {"start": raw, "first": raw, "stop": 1, "left": 0},
                        rep=rep),
                 result("start", "cloudlab-ipp", {"start": ours, "first": 0.3, "stop": 0.2,
                                                  "left": 0, "import": 0.8 + rep / 10},
                        rep=rep),
                 result("start", "cloudlab-ipp", {"start": 0.5, "first": 0.2, "stop": 0.2,
                                                  "left": 0}, rep=rep, variant="warm")]
    runs += [result("pi", "numpy", {"rate": 1e8}),
             result("pi", "cloudlab-dask", {"rate1": 4e9, "rate2": 7.2e9, "efficiency": 0.9}),
             # rtt: raw and cloudlab timed in one process, in turns
             result("rtt", "cloudlab-ipp", {"rtt": 0.009, "raw_rtt": 0.01},
                    paired_with="raw-ipp"),
             {"kind": "rtt", "subject": "cloudlab-dask", "paired_with": "raw-dask",
              "values": {}, "error": "Boom: x"}]
    rows = {(r.name, r.engine): r for r in bench.build_rows(runs, bench.FULL, "full")}
    start = rows["start16", "ipyparallel"]
    # A cold start is compared with the raw engine only; the targets are the warm rows'.
    assert start.raw_median == 10.0 and start.cloudlab_median == 1.2 and start.met is None
    assert start.speedup == pytest.approx(10 / 1.2) and start.regression is None
    warm = rows["start16 warm", "ipyparallel"]
    assert warm.raw_median == 10.0 and warm.cloudlab_median == 0.5 and warm.met is True
    assert rows["first16 warm", "ipyparallel"].met is True  # 0.2 s <= 0.5 s
    floor = rows["import", "ipyparallel"]
    assert floor.cloudlab_median == pytest.approx(0.9) and floor.regression is None
    assert rows["stop16", "ipyparallel"].speedup == 5
    assert rows["pi per core", "dask"].cloudlab == [4.0]
    assert rows["pi per core", "dask"].raw == [0.1]
    assert rows["pi efficiency", "dask"].cloudlab == [90.0]
    assert rows["pi efficiency", "dask"].met is True
    rtt = rows["rtt", "ipyparallel"]
    assert rtt.unit == "ms" and (rtt.raw, rtt.cloudlab) == ([10.0], [9.0]) and rtt.met
    # A measuring process that crashed gave neither number: that fails the run.
    assert "Boom" in rows["rtt", "dask"].regression
    assert ("map", "dask") not in rows  # not run, not shown


def test_only_accepts_measure_names_and_refuses_others():
    assert bench.choose_kinds("rtt, map") == ["map", "rtt"]
    assert bench.choose_kinds(["stop16", "start16"]) == ["start"]
    assert bench.choose_kinds(None) == bench.KINDS
    with pytest.raises(ValueError, match="choose from"):
        bench.choose_kinds("speed")
    # Quick starts 2 engines for its large start: start2 is then that same measure.
    assert bench.choose_kinds("start2,stop,map", bench.QUICK) == ["start", "map"]
    assert "start2" not in bench.choose_kinds(None, bench.QUICK)


def test_interleaved_plan_runs_raw_beside_cloudlab_and_warm_only_for_starts():
    plan = bench.specs("start", bench.QUICK)
    assert [(s["subject"], s.get("variant")) for s in plan] == [
        ("raw-ipp", None), ("cloudlab-ipp", None), ("cloudlab-ipp", "warm"),
        ("raw-dask", None), ("cloudlab-dask", None), ("cloudlab-dask", "warm")]
    assert all("variant" not in s for s in bench.specs("map", bench.QUICK))
    # Round trips: each raw engine is timed in cloudlab's process, in turns with it.
    assert [(s["subject"], s["paired_with"]) for s in bench.specs("rtt", bench.QUICK)] == [
        ("cloudlab-ipp", "raw-ipp"), ("cloudlab-dask", "raw-dask")]


def test_cli_refuses_an_unknown_measure_in_one_line(capsys):
    from cloudlab.cli import main

    assert main(["bench", "--quick", "--only", "speed"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "choose from" in err and "rtt" in err


# ------------------------------------------------------------------ real runs
def bench_processes() -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if bench.TAG in proc.environ() and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def test_a_hung_run_is_killed_with_everything_it_started():
    # Raw ipyparallel puts its engines in sessions of their own: killing the
    # measuring process's group alone would leave them running.
    result = bench.run_one({"kind": "start", "subject": "raw-ipp", "n": 2}, timeout=3)
    assert "timed out after 3 s" in result["error"]
    assert bench_processes() == []


def test_quick_cli_run_compares_all_four_subjects(tmp_path):
    out = tmp_path / "results"
    proc = subprocess.run([sys.executable, "-m", "cloudlab.cli", "bench", "--quick",
                           "--only", "rtt,map", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert "cloudlab/raw" in proc.stdout, proc.stdout + proc.stderr
    data = json.loads((out / "bench.json").read_text())
    rows = {(r["measure"], r["engine"]): r for r in data["rows"]}
    assert set(rows) == {(m, e) for m in ("map", "rtt") for e in ("ipyparallel", "dask")}
    for r in rows.values():
        assert (r["raw_median"] or 0) > 0 and (r["cloudlab_median"] or 0) > 0, (
            f"{r['name']} on {r['engine']} lacks a number: {r['errors']}")
    assert proc.returncode == (1 if data["regressions"] else 0), proc.stdout
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert bench_processes() == []
    assert wait_until_gone(timeout=5) == []

"""The Cluster contract, run for every engine kind on the local backend."""

import asyncio
import math
import os

import numpy as np
import psutil
import pytest

import cloudlab
from cloudlab.onhost import calls


def square(x):
    return x * x


def test_map_returns_ordered_results_identical_to_a_local_loop(cluster):
    items = list(range(1000))
    assert cluster.map(square, items) == [square(x) for x in items]
    assert cluster.map(square, []) == []


def test_map_with_lambda_and_explicit_chunksize(cluster, monkeypatch):
    engine = cluster._engine
    calls = []
    original = engine.submit_to

    async def counting_submit_to(eid, fn, *args):
        calls.append(len(args[1]))
        return await original(eid, fn, *args)

    monkeypatch.setattr(engine, "submit_to", counting_submit_to)
    assert cluster.map(lambda x: x + 1, range(10), chunksize=3) == list(range(1, 11))
    assert sorted(calls, reverse=True) == [3, 3, 3, 1]
    calls.clear()
    cluster.map(square, range(120))
    assert len(calls) == 3 * 4  # automatic: four chunks per engine
    with pytest.raises(ValueError, match="chunksize must be a positive whole number"):
        cluster.map(square, range(3), chunksize=0)


def test_submit_returns_a_future(cluster):
    futures = [cluster.submit(math.factorial, n) for n in range(10)]
    assert [f.result(timeout=30) for f in futures] == [math.factorial(n) for n in range(10)]


def test_push_then_functions_see_the_pushed_name(cluster):
    cluster.push(offset=100, table={"a": 1})
    assert cluster.pull("offset") == {i: 100 for i in cluster.engine_ids}

    def add_offset(x):
        return x + offset  # noqa: F821 - defined on the engines by push

    assert cluster.map(add_offset, [1, 2, 3]) == [101, 102, 103]
    assert cluster.submit(lambda: table["a"]).result(timeout=30) == 1  # noqa: F821


def test_pushed_value_on_engine_wins_over_client_global(cluster):
    global shadowed
    shadowed = "client"
    cluster.push(shadowed="engine")
    assert cluster.map(lambda _: shadowed, range(3)) == ["engine"] * 3


def test_scatter_and_gather_round_trip_lists_and_arrays(cluster):
    cluster.scatter("part", list(range(10)))
    sizes = cluster.run(lambda: len(part))  # noqa: F821
    assert sorted(sizes.values()) == [3, 3, 4] and sum(sizes.values()) == 10
    assert cluster.gather("part") == list(range(10))
    array = np.arange(12.0)
    cluster.scatter("arr", array)
    assert np.array_equal(cluster.gather("arr"), array)


def test_pull_of_an_undefined_name_is_one_collapsed_error(cluster):
    with pytest.raises(cloudlab.RemoteError) as e:
        cluster.pull("never_defined")
    assert str(e.value).startswith("NameError: name 'never_defined' is not defined on this "
                                   "engine on 3 engines [0-2]")


def test_errors_on_many_engines_collapse_with_one_traceback(cluster):
    def risky(x):
        return 1 / (x - x)

    with pytest.raises(cloudlab.RemoteError) as e:
        cluster.map(risky, range(30))
    err = e.value
    assert list(err.groups) == [("ZeroDivisionError", "division by zero")]
    assert set(err.engine_ids) <= set(cluster.engine_ids) and err.engine_ids
    assert str(err).count("Traceback (most recent call last)") == 1
    # The remote traceback quotes the user's own file and line, and no cloudlab frames.
    assert f'File "{__file__}"' in err.traceback and "return 1 / (x - x)" in err.traceback
    assert "calls.py" not in err.traceback


def settled_status(cluster, timeout=5.0):
    """Status once the controller has booked every finished task (it lags by milliseconds)."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        rows = cluster.status()
        if {r.state for r in rows} == {"idle"} or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)


def test_status_reports_real_engine_processes(cluster):
    rows = settled_status(cluster)
    assert [r.id for r in rows] == [0, 1, 2]
    assert {r.state for r in rows} == {"idle"}
    # The host as its machine names itself (a batch scheduler's job: as the scheduler does).
    seen = cluster.run(lambda: (os.getpid(), os.environ["CLOUDLAB_CLUSTER"],
                                os.environ["CLOUDLAB_ENGINE_ID"],
                                os.environ.get("SLURMD_NODENAME", os.uname().nodename)))
    for r in rows:
        assert seen[r.id] == (r.pid, cluster.name, str(r.id), r.host)
        # ps and top name the process after its cluster and engine
        title = " ".join(psutil.Process(r.pid).cmdline()).strip()
        assert title == f"cloudlab: {cluster.name} engine-{r.id}"


def test_status_shows_busy_engines(cluster):
    import time

    future = cluster.submit(time.sleep, 1.5)
    deadline = time.monotonic() + 5
    states = set()
    while time.monotonic() < deadline and "busy" not in states:
        states = {r.state for r in cluster.status()}
    future.result(timeout=10)
    assert "busy" in states


def test_execute_streams_each_engines_output(cluster):
    lines = []
    cluster.execute("import os\nprint('pid', os.environ['CLOUDLAB_ENGINE_ID'])\nmarker = 7",
                    sink=lambda eid, stream, text: lines.append((eid, stream, text)))
    assert sorted(lines) == [(i, "stdout", f"pid {i}\n") for i in cluster.engine_ids]
    assert cluster.pull("marker") == {i: 7 for i in cluster.engine_ids}


def test_execute_streams_output_while_the_cell_still_runs(cluster):
    import time

    arrivals = []
    t0 = time.monotonic()
    cluster.execute("import time\nprint('before', flush=True)\ntime.sleep(1.5)\nprint('after')",
                    sink=lambda eid, stream, text: arrivals.append((time.monotonic() - t0, text)),
                    targets=[0])
    total = time.monotonic() - t0
    assert [text for _, text in arrivals] == ["before\n", "after\n"]
    assert arrivals[0][0] < total - 1.0  # the first line came well before the end


def test_execute_on_targets_and_error_collapse(cluster):
    out = []
    cluster.execute("print('hi')", sink=lambda *a: out.append(a), targets=[1])
    assert out == [(1, "stdout", "hi\n")]
    with pytest.raises(cloudlab.RemoteError, match=r"ValueError: boom on 3 engines \[0-2\]"):
        cluster.execute("raise ValueError('boom')", sink=lambda *a: None)


def test_native_client_is_exposed(cluster):
    if cluster.engine_kind == "ipyparallel":
        import ipyparallel

        assert isinstance(cluster.client, ipyparallel.Client)
        assert sorted(cluster.client.ids) == cluster.engine_ids
        assert cluster.client[:].apply_sync(lambda: 3) == [3, 3, 3]
    else:
        import distributed

        assert isinstance(cluster.client, distributed.Client)
        assert cluster.client.submit(lambda: 3).result() == 3
        assert len(cluster.client.scheduler_info()["workers"]) == 3


def test_async_twins_work_from_another_event_loop(cluster):
    async def main():
        results = await cluster.amap(square, range(5))
        value = await cluster.asubmit(square, 7)
        await cluster.apush(z=1)
        pulled = await cluster.apull("z")
        status = await cluster.astatus()
        return results, value, pulled, len(status)

    assert asyncio.run(main()) == ([0, 1, 4, 9, 16], 49, {0: 1, 1: 1, 2: 1}, 3)

    async def the_others():
        ran = await cluster.arun(square, 3)
        await cluster.ascatter("part3", [1, 2, 3])
        gathered = await cluster.agather("part3")
        lines: list = []
        await cluster.aexecute("print(z)", sink=lambda *said: lines.append(said), targets=[1])
        await cluster.aforget("z", "part3")
        await cluster.await_for_engines()
        await cluster.ascale(len(cluster.engine_ids))  # (as many as it has: nothing changes)
        await cluster.async_()
        return ran, gathered, lines, await cluster.acancel()

    assert asyncio.run(the_others()) == ({0: 9, 1: 9, 2: 9}, [1, 2, 3], [(1, "stdout", "1\n")],
                                         0)
    with pytest.raises(cloudlab.RemoteError, match="NameError"):
        cluster.pull("z")


def test_remote_helpers_keep_names_pushed_later():
    shipped = calls.Shipped(lambda: later_name)  # noqa: F821
    namespace = calls.namespace()  # (an IPython shell's, where a test has made one)
    namespace["later_name"] = 5
    try:
        assert shipped() == 5
    finally:
        del namespace["later_name"]


def test_output_printed_by_mapped_functions_appears_here_prefixed(cluster, capsys):
    import sys as _sys

    def noisy(x):
        print("item", x)
        print("warn", x, file=_sys.stderr)
        return x

    assert cluster.map(noisy, range(6)) == list(range(6))
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert sorted(line.split("] ", 1)[1] for line in lines) == [f"item {i}" for i in range(6)]
    assert all(line[0] == "[" and int(line[1:line.index("]")]) in cluster.engine_ids
               for line in lines)
    assert sorted(line.split("] ", 1)[1] for line in err.splitlines()) == [
        f"warn {i}" for i in range(6)]
    cluster.run(print, "everywhere")
    assert sorted(capsys.readouterr().out.splitlines()) == [
        f"[{i}] everywhere" for i in cluster.engine_ids]


def test_output_before_a_failure_is_still_shown(cluster, capsys):
    def fails(x):
        print("about to fail")
        raise KeyError(x)

    with pytest.raises(cloudlab.RemoteError, match="KeyError"):
        cluster.submit(fails, 1).result(timeout=30)
    assert "about to fail" in capsys.readouterr().out


def test_on_result_reports_every_item_in_the_callers_thread(cluster):
    import threading

    seen = []
    caller = threading.current_thread()

    def record(index, value):
        assert threading.current_thread() is caller
        seen.append((index, value))

    assert cluster.map(square, range(20), chunksize=3, on_result=record) == [
        square(x) for x in range(20)]
    assert sorted(seen) == [(i, square(i)) for i in range(20)]

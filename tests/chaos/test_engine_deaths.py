"""Engines die under work: results stay exact, engines are replaced, causes are named."""

from __future__ import annotations

import os
import random
import signal
import threading
import time

import pytest

import cloudlab
from chaos_helpers import kill, wait_for
from conftest import wait_until_gone


def slow_square(x: int) -> int:
    time.sleep(0.003)  # 10,000 items on 4 engines: about 8 s, long enough for 3 kills
    return x * x


def die_on(x: int, sig: int) -> int:
    """Ends its own engine on item 7, the way a crash would."""
    if x == 7:
        if sig == 0:
            os._exit(3)
        os.kill(os.getpid(), sig)
        time.sleep(5)
    return x


def engine_pids(c: cloudlab.Cluster) -> dict[int, int]:
    return {eid: p.pid for eid, p in c._members.processes.items() if p.alive()}


@pytest.mark.parametrize("engine", ["ipyparallel", "dask"])
def test_a_map_under_a_chaos_thread_returns_exactly_the_right_results(engine, reliability):
    items = list(range(10_000))
    killed: list[int] = []
    with cloudlab.Cluster(4, engine=engine) as c:
        stop = threading.Event()

        def chaos() -> None:
            rng = random.Random(1)
            while not stop.wait(2.0):
                pids = engine_pids(c)
                if pids:
                    victim = rng.choice(sorted(pids))
                    killed.append(victim)
                    kill(pids[victim])

        thread = threading.Thread(target=chaos, daemon=True)
        t0 = time.monotonic()
        thread.start()
        try:
            out = c.map(slow_square, items, chunksize=50)
        finally:
            stop.set()
            thread.join()
        seconds = time.monotonic() - t0
        assert out == [x * x for x in items]
        assert len(killed) >= 2, f"the map ended before the chaos thread killed twice ({seconds:.1f} s)"
        deaths = [d for d in c.deaths if not d.ordered]
        assert [d.engine for d in deaths] == killed
        assert all(d.cause == "was killed by signal 9 (SIGKILL)" for d in deaths), deaths
        # Every victim is replaced: four engines again, none of them a dead one.
        wait_for(lambda: len(c._members.usable()) == 4, 30)
        assert not set(c.engine_ids) & set(killed)
        assert sum(c.tasks_done.values()) >= len(items)
        reliability("engine killed (kill -9) during a map", engine,
                    f"{len(killed)} kills in {seconds:.1f} s; 10,000 exact results", seconds)
        assert c.map(slow_square, range(8)) == [x * x for x in range(8)]
    assert wait_until_gone(c.name, 10) == []


@pytest.mark.parametrize("sig, cause", [
    (signal.SIGSEGV, "was killed by signal 11 (SIGSEGV)"),
    (signal.SIGKILL, "was killed by signal 9 (SIGKILL)"),
    (0, "exited with code 3"),
])
def test_a_crash_is_classified_and_the_task_retried_then_reported_in_one_line(sig, cause, engine,
                                                                             reliability):
    with cloudlab.Cluster(2, engine=engine, task_retries=1) as c:
        with pytest.raises(cloudlab.TaskLost) as lost:
            c.map(lambda x: die_on(x, sig), range(10), chunksize=1)
        error = lost.value
        assert len(error.deaths) == 2  # the first run and one retry, each on its own engine
        assert all(d.cause == cause for d in error.deaths)
        message = str(error)
        assert "\n" not in message
        assert message.startswith("item 7 of map <lambda> was lost with 2 engines")
        assert cause in message and "task_retries is 1" in message
        # Both dead engines were replaced and the cluster still works.
        seconds = wait_for(lambda: len(c._members.usable()) == 2, 30)
        assert c.map(abs, [-1, -2]) == [1, 2]
        if sig == signal.SIGSEGV:
            reliability("a task segfaults its engine, twice (task_retries = 1)", engine,
                        message.split(" and is not", 1)[0], seconds)


def test_an_engine_killed_while_idle_is_replaced_under_a_new_id(engine, reliability):
    with cloudlab.Cluster(3, engine=engine) as c:
        victim = c.engine_ids[1]
        kill(c._members.processes[victim].pid)
        t0 = time.monotonic()
        noticed = wait_for(lambda: victim not in c.engine_ids, 5)
        wait_for(lambda: len(c._members.usable()) == 3, 30)
        [death] = c.deaths
        assert (death.engine, death.cause) == (victim, "was killed by signal 9 (SIGKILL)")
        assert victim not in c.engine_ids and max(c.engine_ids) == 3  # the next id
        assert sorted(c.run(abs, -1).values()) == [1, 1, 1]
        reliability("idle engine killed (kill -9)", engine,
                    f"noticed in {noticed:.2f} s, replacement usable", time.monotonic() - t0)


@pytest.mark.parametrize("engine", ["ipyparallel", "dask"])
def test_engines_that_join_later_are_given_what_was_pushed_and_a_lost_part(engine):
    """An engine added by scale, or replacing a killed one, has every pushed name (a shared
    array included), and the killed engine's part of a scattered name: gather keeps order."""
    import numpy as np

    with cloudlab.Cluster(2, engine=engine) as c:
        c.push(scale=3, table=np.arange(1_000_000))
        c.scatter("part", list(range(10)))
        c.scale(3)
        assert c.map(lambda x: scale * x + int(table[-1]), range(6)) == [  # noqa: F821
            999_999 + 3 * x for x in range(6)]
        assert c.pull("scale") == {0: 3, 1: 3, 2: 3}

        victim = c.engine_ids[0]
        kill(engine_pids(c)[victim])
        wait_for(lambda: c.death_of(victim) is not None and len(c._members.usable()) == 3, 30)
        [joined] = set(c.engine_ids) - {0, 1, 2}
        assert c.pull("scale")[joined] == 3
        assert c.run(lambda: int(table.sum())) == {  # noqa: F821
            eid: 499_999_500_000 for eid in c.engine_ids}
        assert c._scattered["part"][0][0] == joined  # engine 0's part is on the newcomer
        assert c.gather("part") == list(range(10))

        c.scale(1)  # keeps engine 1: part 0, now on the replacement, is gone
        with pytest.raises(ValueError, match=r"^Part 0 of 'part' was on an engine that has "
                                             r"gone, .*: scale the cluster up, or scatter "
                                             r"'part' again\.$"):
            c.gather("part")
        c.push(scale=4)
        c.scale(2)
        assert set(c.pull("scale").values()) == {4}  # the newest value, not the first
        assert c.gather("part") == list(range(10))
    assert c._pushed == {} and c._scattered == {} and c._shared == {}
    assert wait_until_gone(timeout=10) == []

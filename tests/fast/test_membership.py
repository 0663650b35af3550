"""Engine membership under scripted faults, on in-process engines: deterministic, and fast.

Retry accounting, replacement (and its storms), failed starts, GPU slots and an MPI world's
rules, each with exact figures. The same rules are tested with real processes in
tests/chaos and tests/test_lifecycle.py; here each fault is one line of script.
"""

from __future__ import annotations

import json
import threading
import time

import pytest
from fast_helpers import FAST, until

import cloudlab
from cloudlab.engines.inprocess import crash
from cloudlab.membership import STORM_DEATHS


def crash_on_7_late(x: int) -> int:
    """Item 7 ends its engine once the engine surely holds the next piece too."""
    if x == 7:
        time.sleep(0.2)
        crash()
    return x


def record_of(c: cloudlab.Cluster) -> dict:
    return json.loads(c._members.record.path.read_text())


def test_a_piece_that_kills_its_engine_is_charged_once_per_engine_then_lost():
    with cloudlab.Cluster(3, task_retries=2, **FAST) as c:
        with pytest.raises(cloudlab.TaskLost) as lost:  # (7, the last, runs alone each time)
            c.map(crash_on_7_late, range(8), chunksize=1)
        assert [d.cause for d in lost.value.deaths] == ["was killed by signal 9 (SIGKILL)"] * 3
        assert str(lost.value).startswith("item 7 of map crash_on_7_late was lost with 3 engines")
        assert "task_retries is 2" in str(lost.value)
        until(lambda: len(c._members.usable()) == 3)
        assert c.engine_ids == [3, 4, 5] and c.n == 3  # three replacements, new ids
        assert c.map(abs, [-1, -2, -3]) == [1, 2, 3]


def test_a_piece_on_an_engine_that_held_two_is_not_charged_but_runs_alone():
    """Which of two pieces killed the engine is unknown: neither is charged, each reruns
    alone, and the guilty one is then charged on its own."""
    with cloudlab.Cluster(2, task_retries=1, **FAST) as c:
        with pytest.raises(cloudlab.TaskLost) as lost:
            c.map(crash_on_7_late, range(16), chunksize=1)
        assert len(lost.value.deaths) == 2  # its own two deaths; the first was uncharged
        assert len(c.deaths) == 3


def test_results_stay_exact_when_engines_are_killed_under_a_map():
    def slow(x):
        time.sleep(0.002)
        return x * x

    with cloudlab.Cluster(4, **FAST) as c:
        c.run(abs, 0)
        killed = []

        def kill_two(index, value):
            if index in (100, 300):
                victim = c._members.usable()[0]
                killed.append(victim)
                c._members.processes[victim].kill()

        assert c.map(slow, range(500), chunksize=10, on_result=kill_two) == [
            x * x for x in range(500)]
        assert [d.engine for d in c.deaths] == killed
        until(lambda: len(c._members.usable()) == 4)


def test_a_storm_of_deaths_stops_replacement_and_the_cluster_wants_what_it_has():
    with cloudlab.Cluster(2, **FAST) as c:
        for _ in range(STORM_DEATHS + 1):
            until(lambda: len(c._members.usable()) == 2 or c._members.not_replaced)
            if c._members.not_replaced:
                break
            c._members.processes[c._members.usable()[0]].kill()
            until(lambda: len(c.deaths) and c._members.processes.keys() != set())
            until(lambda: all(p.alive() for p in c._members.processes.values()))
        until(lambda: c._members.not_replaced is not None)
        assert len(c.deaths) == STORM_DEATHS + 1
        assert c._members.not_replaced.startswith(f"{STORM_DEATHS + 1} engines died within "
                                                  f"60 s, the last one was killed by signal 9")
        assert c.n == len(c.engine_ids) == 1
        c._members.processes[c.engine_ids[0]].kill()
        until(lambda: not c.engine_ids)
        with pytest.raises(cloudlab.ClusterStateError, match=r"no engine left to run map abs: "
                                                             r"22 engines died within 60 s"):
            c.map(abs, [1])
        c.scale(2)  # what is wanted again: two engines
        assert c.map(abs, [-1, -2]) == [1, 2] and len(c.engine_ids) == 2


def test_without_replacement_a_death_lowers_what_is_wanted():
    with cloudlab.Cluster(3, replace_dead_engines=False, **FAST) as c:
        c._members.processes[1].kill()
        until(lambda: c.engine_ids == [0, 2])
        time.sleep(0.1)
        assert c.n == 2 and c.engine_ids == [0, 2] and record_of(c)["engines"] == 2


def test_a_launch_that_fails_during_start_leaves_nothing():
    c = cloudlab.Cluster(3, **FAST)
    c._backend.script.refuse["engine-2"] = "no room on the host"
    with pytest.raises(cloudlab.StartError, match="no room on the host"):
        c.start()
    assert c.state == "failed" and c.engine_ids == []
    assert not c._members.record.path.exists()
    assert all(not p.alive() for p in c._backend.launched)


def test_an_engine_that_exits_during_start_is_named_with_its_code():
    c = cloudlab.Cluster(3, **FAST)
    c._backend.script.exit_at_start["engine-1"] = 7
    with pytest.raises(cloudlab.StartError, match=r"^engine-1 of cluster .* exited during start "
                                                  r"\(exit code 7, last output: engine-1: "
                                                  r"ended during its start \(scripted\)\); "
                                                  r"nothing is left running\.$"):
        c.start()
    assert all(not p.alive() for p in c._backend.launched)


def test_engines_that_fail_after_an_early_return_are_dropped_and_no_longer_wanted():
    c = cloudlab.Cluster(4, launch_delay=0.0, **FAST)
    c._backend.script.delay.update({"engine-2": 0.5, "engine-3": 0.5})
    c._backend.script.exit_at_start["engine-3"] = 1
    with c.start(min_engines=2):
        assert c.n == 4
        with pytest.raises(cloudlab.StartError, match="engine-3 .* exited during start"):
            c.wait_for_engines()
        assert c.engine_ids == [0, 1, 2] and c.n == 3 and record_of(c)["engines"] == 3
        assert c.map(abs, [-1, -2, -3]) == [1, 2, 3]


def test_a_start_past_its_timeout_says_how_many_were_ready():
    c = cloudlab.Cluster(2, start_timeout=0.3, **FAST)
    c._backend.script.delay["engine-1"] = 60
    with pytest.raises(cloudlab.ProvisionTimeout, match=r"1 of 2 engines"):
        c.start()
    assert c.state == "failed" and all(not p.alive() for p in c._backend.launched)


def test_scale_adds_new_ids_and_removes_the_highest_and_the_record_follows():
    with cloudlab.Cluster(2, **FAST) as c:
        c.scale(5)
        assert c.engine_ids == [0, 1, 2, 3, 4] and record_of(c)["engines"] == 5
        c.scale(2)
        assert c.engine_ids == [0, 1] and c.n == 2 and record_of(c)["engines"] == 2
        c._backend.script.refuse["engine-5"] = "host full"
        with pytest.raises(cloudlab.StartError, match=r"host full"):
            c.scale(4)
        assert c.engine_ids == [0, 1] and c.n == 2  # none of the new ones stays


def test_gpus_go_one_per_engine_and_a_dead_engines_gpu_to_its_replacement():
    with cloudlab.Cluster(**FAST, gpus="all", pretend_gpus=3) as c:
        assert c.n == 3 and [g.index for g in c.gpus] == [0, 1, 2]
        held = {eid: g.index for eid, g in c._members.gpu_of.items()}
        assert held == {0: 0, 1: 1, 2: 2}
        assert [r.gpu for r in c.status()] == [f"{i}: Pretend GPU" for i in range(3)]
        with pytest.raises(cloudlab.ConfigError, match="one engine per GPU on 3 GPUs: scale "
                                                       "it to 3 engines at most"):
            c.scale(4)
        c._members.processes[1].kill()
        until(lambda: 3 in c._members.usable())
        assert {eid: g.index for eid, g in c._members.gpu_of.items()} == {0: 0, 2: 2, 3: 1}
        c.scale(1)
        assert {eid: g.index for eid, g in c._members.gpu_of.items()} == {0: 0}


def test_an_mpi_world_starts_whole_keeps_its_size_and_a_dead_rank_is_not_replaced():
    with cloudlab.Cluster(3, mpi=True, **FAST) as c:
        assert c.engine_ids == [0, 1, 2]
        with pytest.raises(cloudlab.ConfigError, match="one MPI job of 3 ranks, whose size is "
                                                       "fixed"):
            c.scale(4)
        c._members.processes[1].kill()
        until(lambda: c.engine_ids == [0, 2])
        assert c._members.not_replaced.startswith("a rank of an MPI job cannot be replaced")
        assert c.engine_ids == [0, 2] and c.n == 2


def test_a_killed_controller_ends_the_cluster_and_says_why():
    with cloudlab.Cluster(2, **FAST) as c:
        c._members.controller.kill()
        until(lambda: c.state == "dead")
        with pytest.raises(cloudlab.ClusterStateError, match=r"is dead: its controller was "
                                                             r"killed by signal 9"):
            c.map(abs, [1])
    assert all(not p.alive() for p in c._backend.launched)


RELEASE = threading.Event()


def wait_for_release(x: int) -> bool:
    return RELEASE.wait(5)


def test_cancel_ends_the_busy_engines_and_they_are_replaced():
    with cloudlab.Cluster(2, **FAST) as c:
        c.run(abs, 0)
        future = cloudlab._aio.submit(c.amap(wait_for_release, range(4), chunksize=1))
        until(lambda: len(c._jobs) == 1 and c.status() and
              {r.state for r in c.status()} == {"busy"})
        assert c.cancel() == 1
        with pytest.raises(cloudlab.Cancelled):
            future.result(5)
        RELEASE.set()
        assert [d.ordered for d in c.deaths] == [True, True]
        until(lambda: len(c._members.usable()) == 2)
        assert c.engine_ids == [2, 3]


def test_a_frozen_engine_takes_and_answers_nothing_until_it_thaws():
    """The stand-in for SIGSTOP (a frozen VM, a cut link): its process stays alive and its
    controller still counts it, but its work waits."""
    with cloudlab.Cluster(2, **FAST) as c:
        c._members.processes[1].freeze()
        future = cloudlab._aio.submit(c.arun(abs, -1))
        time.sleep(0.3)
        assert not future.done() and c._members.usable() == [0, 1]
        c._members.processes[1].thaw()
        assert future.result(5) == {0: 1, 1: 1}


def test_the_inprocess_kind_elsewhere_and_another_kind_in_process_are_one_sentence():
    with pytest.raises(cloudlab.ConfigError, match=r"^The inprocess engine kind runs as threads "
                                                   r"of this process, on the inprocess backend, "
                                                   r"not on local: add --backend inprocess"):
        cloudlab.Cluster(2, engine="inprocess")
    c = cloudlab.Cluster(2, engine="dask", backend="inprocess")
    with pytest.raises(cloudlab.ConfigError, match=r"runs only the inprocess engine kind"):
        c.start()
    assert c.state == "failed" and all(not p.alive() for p in c._backend.launched)

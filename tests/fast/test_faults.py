"""Every call under an engine's death or freeze, on in-process engines: the rules, in
milliseconds. A call on every engine ends with one sentence naming the engine and its cause
(and what the others returned); map reruns lost pieces and returns exact results; a frozen
engine is ended once its controller has heard nothing from it for heartbeat_timeout, and
replaced. tests/chaos/test_fault_matrix.py inflicts the same faults on real processes."""

from __future__ import annotations

import threading
import time

import pytest
from fast_helpers import FAST, until

import cloudlab
from cloudlab import membership
from cloudlab.dispatch import VERDICT

#: Seconds a frozen engine may stay silent here: short, so that each test is quick.
SILENCE = 0.3


def nap(seconds: float) -> int:
    time.sleep(seconds)
    from cloudlab.onhost.calls import engine_id

    return engine_id()


def slow_square(x: int) -> int:
    time.sleep(0.02)
    return x * x


def after(seconds: float, fault) -> threading.Timer:
    timer = threading.Timer(seconds, fault)
    timer.start()
    return timer


def process_of(c: cloudlab.Cluster, eid: int):
    return c._members.processes[eid]


def test_an_engine_killed_during_run_ends_it_in_one_sentence_with_the_others_results():
    with cloudlab.Cluster(3, **FAST) as c:
        after(0.1, process_of(c, 1).kill)
        started = time.monotonic()
        with pytest.raises(cloudlab.EngineLost) as lost:
            c.run(nap, 0.4)
        assert time.monotonic() - started < VERDICT  # at once, not after a verdict's wait
        assert str(lost.value) == (
            "run nap did not finish on every engine: engine 1 was killed by signal 9 "
            "(SIGKILL); engines 0,2 answered (what they returned is this error's .results). "
            "Run it again on the engines there are now.")
        assert lost.value.results == {0: 0, 2: 2}
        assert [d.engine for d in lost.value.deaths] == [1]
        until(lambda: len(c._members.usable()) == 3)  # replaced
        assert sorted(c.run(nap, 0).values()) == [0, 2, 3]


def test_a_frozen_engine_is_ended_after_heartbeat_timeout_and_named_as_silent():
    with cloudlab.Cluster(2, heartbeat_timeout=SILENCE, **FAST) as c:
        frozen = process_of(c, 1)
        after(0.05, frozen.freeze)
        started = time.monotonic()
        with pytest.raises(cloudlab.EngineLost,
                           match=r"^run nap did not finish on every engine: engine 1 stopped "
                                 r"answering for 0\.3 s \(SIGSTOP, a frozen VM or a cut link\); "
                                 r"engine 0 answered") as lost:
            c.run(nap, 0.2)
        took = time.monotonic() - started
        assert SILENCE < took < SILENCE + 1.0, took
        assert lost.value.results == {0: 0}
        assert frozen.exit_code() == -9  # ended, as SIGKILL ends a stopped process
        assert c.death_of(1).cause.startswith("stopped answering")
        until(lambda: len(c._members.usable()) == 2)


def test_map_reruns_a_frozen_engines_pieces_and_returns_exact_results():
    with cloudlab.Cluster(2, heartbeat_timeout=SILENCE, **FAST) as c:
        after(0.05, process_of(c, 1).freeze)
        assert c.map(slow_square, range(40), chunksize=1) == [x * x for x in range(40)]
        assert [d.engine for d in c.deaths] == [1]


def test_execute_names_the_engine_lost_and_shows_the_others_output():
    with cloudlab.Cluster(2, **FAST) as c:
        printed: list[tuple[int, str]] = []
        after(0.1, process_of(c, 0).kill)
        with pytest.raises(cloudlab.EngineLost, match=r"^execute did not finish on every "
                                                      r"engine: engine 0 was killed"):
            c.execute("import time; time.sleep(0.3); print('done')",
                      sink=lambda eid, stream, text: printed.append((eid, text)))
        assert printed == [(1, "done\n")]


@pytest.mark.parametrize("call", ["push", "pull", "scatter", "gather", "forget"])
def test_namespace_calls_on_a_frozen_engine_end_in_one_sentence(call):
    with cloudlab.Cluster(2, heartbeat_timeout=SILENCE, **FAST) as c:
        c.scatter("xs", list(range(4)))
        process_of(c, 1).freeze()
        act = {"push": lambda: c.push(x=1), "pull": lambda: c.pull("xs"),
               "scatter": lambda: c.scatter("ys", [1, 2]), "gather": lambda: c.gather("xs"),
               "forget": lambda: c.forget("xs")}[call]
        with pytest.raises(cloudlab.EngineLost, match=rf"^{call}\b.* engine 1 stopped answering"):
            act()


def test_a_frozen_engine_that_thaws_in_time_is_kept():
    with cloudlab.Cluster(2, heartbeat_timeout=1.0, **FAST) as c:
        process = process_of(c, 1)
        process.freeze()
        after(0.3, process.thaw)
        assert sorted(c.run(nap, 0).values()) == [0, 1]
        assert c.deaths == []


def test_heartbeat_timeout_must_be_positive():
    """(A keyword's bad value is named as the caller's, not the profile file's.)"""
    with pytest.raises(cloudlab.ConfigError, match=r"^option 'heartbeat_timeout' must be a "
                                                   r"number of seconds above 0, got 0\.0"):
        cloudlab.Cluster(2, heartbeat_timeout=0, **FAST)


def test_an_engine_that_never_registers_is_started_again_seconds_after_its_peers(monkeypatch):
    monkeypatch.setattr(membership, "STRAGGLER", 0.2)
    c = cloudlab.Cluster(4, **FAST)
    c._backend.script.delay["engine-2"] = 3600  # running, and never registering
    started = time.monotonic()
    with c:
        assert time.monotonic() - started < 1.0  # not start_timeout (120 s)
        assert c.engine_ids == [0, 1, 3, 4]
        assert [(d.engine, d.cause) for d in c.deaths] == [
            (2, "had not registered 0.2 s after its peers; it was started again")]
        assert sorted(c.run(nap, 0).values()) == [0, 1, 3, 4]


def crash_always() -> None:
    from cloudlab.engines.inprocess import crash

    crash()


def test_a_submit_that_kills_every_engine_it_runs_on_ends_in_one_sentence():
    with cloudlab.Cluster(3, task_retries=1, **FAST) as c:
        with pytest.raises(cloudlab.TaskLost, match=r"^its task of submit crash_always was lost "
                                                    r"with 2 engines \(engine \d was killed by "
                                                    r"signal 9 \(SIGKILL\); engine \d was killed"):
            c.submit(crash_always).result(timeout=10)

"""A start that one engine never finishes is a fault too: the straggler is started again
seconds after its peers registered, not after start_timeout; and a start of 128 engines
succeeds, for both kinds. (ipyparallel's hub lost a registration in 6 of 31 starts of 128
here: without the restart, such a start waited 120 s and then threw every engine away.)"""

from __future__ import annotations

import signal
import time

import pytest

import cloudlab
from chaos_helpers import kill, running, wait_for
from cloudlab import membership
from cloudlab.backends.local import LocalBackend
from conftest import wait_until_gone


@pytest.mark.parametrize("engine", ["ipyparallel", "dask"])
def test_an_engine_that_never_registers_is_started_again(engine, monkeypatch, reliability):
    """Engine 2 is stopped (SIGSTOP) as it is launched: it runs, and never registers."""
    monkeypatch.setattr(membership, "STRAGGLER", 2.0)
    launch = LocalBackend.launch
    stopped: list[int] = []

    async def launch_stopping_engine_2(self, command, cleanup=()):
        process = await launch(self, command, cleanup)
        if command.name == "engine-2":
            kill(process.pid, signal.SIGSTOP)
            stopped.append(process.pid)
        return process

    monkeypatch.setattr(LocalBackend, "launch", launch_stopping_engine_2)
    t0 = time.monotonic()
    with cloudlab.Cluster(4, engine=engine, start_timeout=60) as c:
        took = time.monotonic() - t0
        assert took < 30, took  # its peers' start, 2 s, and a start again
        assert c.engine_ids == [0, 1, 3, 4]
        assert [(d.engine, d.cause) for d in c.deaths] == [
            (2, "had not registered 2 s after its peers; it was started again")]
        assert sorted(c.run(abs, -1).values()) == [1] * 4
        wait_for(lambda: not running(stopped[0]), 5)  # the stopped one was ended
    assert wait_until_gone(c.name, 10) == []
    reliability("an engine that never registers (SIGSTOP at launch), STRAGGLER 2 s", engine,
                "started again; the start succeeded (time: the whole start)", took)


@pytest.mark.parametrize("engine", ["ipyparallel", "dask"])
def test_a_start_of_128_engines_succeeds(engine):
    with cloudlab.Cluster(128, engine=engine) as c:
        assert len(c.run(abs, -1)) == 128
    assert wait_until_gone(c.name, 20) == []



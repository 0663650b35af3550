"""A task that allocates past its engine's memory limit ends only that engine."""

from __future__ import annotations

import os

import pytest

import cloudlab
from chaos_helpers import wait_for


def hog(mb: int) -> int:
    import numpy as np

    block = np.ones(mb * 10**6 // 8)  # written, so every page is really held
    return int(block.size)


def engine_env(name: str) -> str | None:
    return os.environ.get(name)  # (os.environ.get itself would pickle this process's environ)


def test_a_task_past_memory_limit_ends_its_engine_names_task_and_limit(engine, reliability):
    with cloudlab.Cluster(2, engine=engine, memory_limit="400MB", task_retries=1) as c:
        assert c.map(hog, [100]) == [100 * 10**6 // 8]  # under the limit: fine
        pids = {p.pid for p in c._members.processes.values()}
        with pytest.raises(cloudlab.TaskLost) as lost:
            c.map(hog, [10, 1000, 10], chunksize=1)
        message = str(lost.value)
        assert message.startswith("item 1 of map hog was lost with 2 engines")
        assert "ran out of memory" in message and "memory_limit of 400 MB" in message
        assert "raise memory_limit" in message
        assert [d.cause.startswith("ran out of memory") for d in lost.value.deaths] == [True] * 2
        assert os.getpid()  # this process (the notebook) is untouched, and so is the cluster:
        seconds = wait_for(lambda: len(c._members.usable()) == 2, 30)
        assert c.map(hog, [10, 10]) == [10 * 10**6 // 8] * 2
        assert pids - {p.pid for p in c._members.processes.values()}  # the hogs' engines were replaced
        reliability("task allocates past memory_limit", engine,
                    message.split(" and is not", 1)[0], seconds)


def test_memory_limit_auto_shares_the_machine_and_none_sets_no_guard():
    from cloudlab.container import share

    with cloudlab.Cluster(2, memory_limit="none") as c:
        assert c._members.memory_limit is None
        assert c.run(engine_env, "CLOUDLAB_MEMORY_LIMIT_MB") == {0: None, 1: None}
    with cloudlab.Cluster(2) as c:
        expected = share().memory * 0.9 / 2  # (the machine's, or its container's share)
        assert c._members.memory_limit == pytest.approx(expected, rel=0.01)
        limits = set(c.run(engine_env, "CLOUDLAB_MEMORY_LIMIT_MB").values())
        assert limits == {f"{expected / 1e6:.0f}"}


@pytest.mark.parametrize("bad, says", [
    ("lots", 'must be a size like "2GB"'),
    ("100MB", "must be at least 200MB"),
    ("nan", 'must be a size like "2GB"'),
])
def test_a_bad_memory_limit_is_one_sentence_naming_the_key(bad, says):
    with pytest.raises(cloudlab.ConfigError, match="^option 'memory_limit'") as error:
        cloudlab.Cluster(2, memory_limit=bad)
    assert says in str(error.value)

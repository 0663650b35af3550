"""push on the local backend: large buffers go through shared memory, once, read-only."""

import os
from pathlib import Path

import numpy as np
import pytest

import cloudlab
from cloudlab import namespaces, shared
from cloudlab.errors import RemoteError


def memfds_of_this_process() -> int:
    """Shared-memory files this process holds open (each pushed value in memory has one)."""
    count = 0
    for fd in Path("/proc/self/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("/memfd:cloudlab-push")
        except OSError:
            pass
    return count


def described(name):
    """On an engine: what a pushed value is, as the engine sees it."""
    import numpy as np

    from cloudlab.onhost.calls import namespace

    value = namespace()[name]
    arrays = value.values() if isinstance(value, dict) else [value]
    return [(float(np.sum(a)), a.shape, str(a.dtype), a.flags.writeable) for a in arrays]


def test_a_large_array_arrives_whole_and_read_only_on_every_engine(cluster):
    a = np.arange(3 * 2**20 // 8, dtype=np.float64).reshape(-1, 8)  # 3 MB
    before = memfds_of_this_process()
    cluster.push(big=a)
    assert memfds_of_this_process() == before + 1  # one copy in memory, not one per engine
    seen = cluster.run(described, "big")
    assert seen == dict.fromkeys(cluster.engine_ids, [(float(a.sum()), a.shape, "float64", False)])
    # Writing to it is refused on the engine, and says why.
    with pytest.raises(RemoteError, match="read-only"):
        cluster.run(lambda: big.__setitem__((0, 0), 1.0))  # noqa: F821 (pushed)
    # Tasks read it like any pushed name.
    assert cluster.map(lambda i: float(big[i].sum()), [0, 1]) == [28.0, 92.0]  # noqa: F821


def test_arrays_inside_containers_are_shared_too_and_small_values_are_not(cluster):
    parts = {"x": np.ones(2**18), "y": np.zeros((512, 512), dtype=np.float32)}  # 2 MB + 1 MB
    before = memfds_of_this_process()
    cluster.push(parts=parts, small=np.ones(10))
    assert memfds_of_this_process() == before + 1  # parts only
    seen = cluster.run(described, "parts")
    assert seen[cluster.engine_ids[0]] == [(262144.0, (2**18,), "float64", False),
                                           (0.0, (512, 512), "float32", False)]
    assert cluster.pull("small") == dict.fromkeys(cluster.engine_ids, pytest.approx(np.ones(10)))


def test_pushing_a_name_again_releases_the_old_memory(cluster):
    cluster.push(again=np.ones(2**18))
    held = memfds_of_this_process()
    cluster.push(again=np.full(2**18, 2.0))
    assert memfds_of_this_process() == held
    cluster.push(again=1)  # a small value replaces it: its memory goes too
    assert memfds_of_this_process() == held - 1
    assert cluster.pull("again") == dict.fromkeys(cluster.engine_ids, 1)


def test_stop_releases_the_shared_memory(engine):
    before = memfds_of_this_process()
    with cloudlab.Cluster(2, engine=engine) as c:
        c.push(a=np.ones(2**18), b=np.ones(2**18))
        assert memfds_of_this_process() == before + 2
    assert memfds_of_this_process() == before


def test_engines_that_cannot_map_our_memory_get_the_value_the_ordinary_way(cluster, monkeypatch):
    def unreachable(value):
        block = shared.share(value)
        if block is not None:  # a descriptor no engine can open
            object.__setattr__(block.value, "fd", 10**6)
        return block

    monkeypatch.setattr(namespaces, "share", unreachable)
    monkeypatch.setattr(cluster, "_share_memory", True)
    a = np.arange(2**18, dtype=np.float64)
    cluster.push(fallback=a)
    assert cluster._share_memory is False  # and it stays on the ordinary path from now on
    seen = cluster.run(described, "fallback")
    assert {v[0][:2] for v in seen.values()} == {(float(a.sum()), a.shape)}


def test_scatter_shares_each_part_and_gather_undoes_it(cluster):
    a = np.arange(3 * 2**19, dtype=np.float64)  # 12 MB: 4 MB a part on 3 engines
    before = memfds_of_this_process()
    cluster.scatter("part", a)
    assert memfds_of_this_process() == before + 3  # one block a part, written once
    seen = cluster.run(described, "part")
    assert [v[0][1:] for _, v in sorted(seen.items())] == [((2**19,), "float64", False)] * 3
    assert np.array_equal(cluster.gather("part"), a)
    cluster.scatter("part", list(range(6)))  # small parts: the ordinary way, memory released
    assert memfds_of_this_process() == before
    assert cluster.gather("part") == list(range(6))


def test_without_memfd_values_travel_the_ordinary_way(cluster, monkeypatch):
    monkeypatch.delattr(os, "memfd_create")  # as on macOS
    before = memfds_of_this_process()
    cluster.push(plain=np.ones(2**18))
    assert memfds_of_this_process() == before
    assert {v[0][3] for v in cluster.run(described, "plain").values()} == {True}  # a copy: writable

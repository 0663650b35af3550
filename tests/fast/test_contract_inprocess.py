"""The contract suite over the in-process engines: the very tests of
tests/test_cluster_contract.py, on 3 engines that are threads of this process, with their
own namespaces and output, and work pickled both ways. Where a test looks at real processes
(their titles, their environment, the native client), it is replaced below by what an
in-process engine has instead."""

import os

import pytest

import cloudlab
from cloudlab.engines.inprocess import Hub
from test_cluster_contract import *  # noqa: F403 (the contract tests, collected here too)
from test_cluster_contract import settled_status


@pytest.fixture(scope="module")
def cluster():
    with cloudlab.Cluster(3, engine="inprocess", backend="inprocess") as c:
        yield c
    assert c.state == "stopped" and c.engine_ids == []


def test_status_reports_real_engine_processes(cluster):
    rows = settled_status(cluster)
    assert [(r.id, r.host, r.pid, r.state) for r in rows] == [
        (i, "inprocess", None, "idle") for i in range(3)]  # no pid: they are not processes
    assert cluster.run(lambda: os.getpid()) == {i: os.getpid() for i in range(3)}


def test_execute_streams_each_engines_output(cluster):
    lines = []
    cluster.execute("from cloudlab.onhost.calls import engine_id\nprint('id', engine_id())\n"
                    "marker = 7", sink=lambda eid, stream, text: lines.append((eid, stream, text)))
    assert sorted(lines) == [(i, "stdout", f"id {i}\n") for i in cluster.engine_ids]
    assert cluster.pull("marker") == {i: 7 for i in cluster.engine_ids}


def test_native_client_is_exposed(cluster):
    assert isinstance(cluster.client, Hub)
    assert sorted(cluster.client.workers) == cluster.engine_ids


def test_each_engine_has_a_namespace_of_its_own(cluster):
    cluster.scatter("mine", [10, 20, 30])
    assert cluster.pull("mine") == {0: [10], 1: [20], 2: [30]}
    assert cluster.gather("mine") == [10, 20, 30]
    cluster.forget("mine")

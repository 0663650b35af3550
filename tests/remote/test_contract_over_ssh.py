"""The local backend's contract suite, unchanged, over the SSH backend: the very tests of
tests/test_cluster_contract.py, with a 3-engine cluster whose engines run on the
network-namespace test hosts through sshd. The hosts share nothing with the client: the
test module's functions reach them as the user's own code, and pytest, which it imports,
as a package the user names for the hosts."""

import pytest

import cloudlab
from conftest import ENGINES, wait_until_gone
from hosts import SSH_PORT
from test_cluster_contract import *  # noqa: F403 (the contract tests, collected here too)


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request, test_hosts):
    """The contract suite's cluster, on the test hosts."""
    with cloudlab.Cluster(3, engine=request.param, backend="ssh",
                          hosts=[f"root@{h.address}:{SSH_PORT}" for h in test_hosts.hosts],
                          identity_file=str(test_hosts.user_key),
                          known_hosts=str(test_hosts.known_hosts),
                          host_packages=["pytest"]) as c:
        yield c
    assert wait_until_gone(c.name, 5) == []

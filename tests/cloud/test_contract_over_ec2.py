"""The local backend's contract suite, unchanged, on EC2 VMs: moto_server is the EC2 API and
each instance boots as a network-namespace host from its user-data (tests/cloud_vms.py), gets
this client's cloudlab over SSH and the engines' packages from the test network's package
index, as a real VM gets them from PyPI. The test module reaches the VMs as the user's own
code; pytest, which it imports, as a package the profile names for the hosts."""

import pytest

import cloudlab
from conftest import ENGINES, wait_until_gone
from test_cluster_contract import *  # noqa: F403 (the contract tests, collected here too)


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request, ec2_cloud):
    """The contract suite's cluster, on three VMs."""
    api, vms, options = ec2_cloud
    overrides = {k: v for k, v in options.items() if k != "backend"}
    with cloudlab.Cluster(3, engine=request.param, profile="aws-cpu", start_timeout=300,
                          host_packages=["pytest"], **overrides) as c:
        yield c
    assert wait_until_gone(c.name, 5) == []

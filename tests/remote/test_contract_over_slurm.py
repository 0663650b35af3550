"""The local backend's contract suite, unchanged, over the Slurm backend: the very tests of
tests/test_cluster_contract.py, with a 3-engine cluster whose engines are Slurm jobs on the
two namespace nodes of the test Slurm cluster, which see none of the client's checkout, venv
or Python: the test module reaches them as the user's code, pytest as a host package."""

import pytest

import cloudlab
from conftest import ENGINES, wait_until_gone
from test_cluster_contract import *  # noqa: F403 (the contract tests, collected here too)


@pytest.fixture(scope="module", params=ENGINES)
def cluster(request, test_slurm, tmp_path_factory):
    """The contract suite's cluster, as Slurm jobs."""
    with cloudlab.Cluster(3, engine=request.param, backend="slurm",
                          client_address=test_slurm.network.client_address,
                          log_dir=str(tmp_path_factory.mktemp("slurm-logs")),
                          env_dir=str(test_slurm.env_dir), host_packages=["pytest"]) as c:
        yield c
    assert wait_until_gone(c.name, 5) == []

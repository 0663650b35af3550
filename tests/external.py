"""Fixtures for parts outside the package: the arXiv corpus, a local Redis, a moto_server
(registered by tests/conftest.py as a plugin)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cloudlab.workloads.classify import SHARED_CORPUS, load_arxiv


@pytest.fixture(scope="session")
def corpus_path() -> Path:
    path = Path(os.environ.get("CLOUDLAB_ARXIV_CORPUS", SHARED_CORPUS))
    if not path.exists():
        pytest.skip(f"the arXiv corpus is not at {path} (see ../shared/data/README.md)")
    return path


@pytest.fixture(scope="session")
def corpus(corpus_path):
    return load_arxiv(corpus_path)


@pytest.fixture
def redis_url():
    from cloudlab.workloads.classify import services

    if not services.redis_available():
        pytest.skip("redis-server is not installed (Debian: apt-get install redis-server)")
    with services.redis_server() as url:
        yield url


@pytest.fixture(scope="module")
def moto_endpoint(monkeypatch_module):
    """A real EC2/IAM/STS/SQS/DynamoDB-compatible HTTP endpoint (moto_server), at loopback
    here; test VMs reach it on the host network's client address."""
    binary = shutil.which("moto_server") or str(Path(sys.executable).parent / "moto_server")
    if not Path(binary).exists():
        pytest.skip("moto_server is not installed (pip install 'moto[server]')")
    with socket.socket() as s:
        s.bind(("", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([binary, "-H", "0.0.0.0", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    for name, value in (("AWS_ACCESS_KEY_ID", "AKIACLOUDLABTESTKEY1"),
                        ("AWS_SECRET_ACCESS_KEY", "cloudlab/test/secret/Xq4v9Zr2Lw8Kd"),
                        ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch_module.setenv(name, value)
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError("moto_server did not start") from None
            time.sleep(0.1)
    yield endpoint
    process.terminate()
    process.wait(10)


@pytest.fixture(scope="session")
def host_homes(tmp_path_factory) -> Path:
    """Where test hosts keep their home folders for the whole run (tests/hosts.py): a host
    of the same index in a later network finds what an earlier one installed, as a
    machine's disk keeps it between sessions."""
    return tmp_path_factory.mktemp("host-homes")


@pytest.fixture(scope="session")
def package_index(tmp_path_factory):
    """The test hosts' package index (tests/package_index.py); at the end of the run, no
    request for the name cloudlab may have reached it."""
    from hosts import missing
    from package_index import PackageIndex

    why = missing()
    if why:
        pytest.skip(f"test hosts cannot be built here: {why}")
    with PackageIndex(tmp_path_factory.mktemp("index")) as index:
        yield index
    assert "cloudlab" not in index.asked(), "a host asked the package index for cloudlab"


@pytest.fixture(scope="module")
def ec2_cloud(moto_endpoint, tmp_path_factory, package_index, host_homes):
    """moto's EC2 with a VPC whose subnet is a host network's /24, and VMs playing its
    instances; yields the options a profile would give."""
    from cloud_vms import FakeVms

    from cloudlab.backends.ec2 import Ec2, Ec2Options
    from hosts import HostNetwork, missing

    why = missing() or (shutil.which("curl") is None and
                        "curl is missing (Debian package curl): the bootstrap uses it")
    if why:
        pytest.skip(f"test VMs cannot be built here: {why}")
    api = Ec2(Ec2Options(endpoint_url=moto_endpoint))
    ami = api.client.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    with HostNetwork(0, tmp_path_factory.mktemp("vms"), homes=host_homes / "vms",
                     shared_home=True) as network:
        vpc = api.client.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
        subnet = api.client.create_subnet(VpcId=vpc, CidrBlock=f"{network.subnet}.0/24")
        with FakeVms(network, api.client, tmp_path_factory.mktemp("fake")) as vms:
            # (The endpoint where the VMs reach it too: their role's queues are there.)
            endpoint = moto_endpoint.replace("127.0.0.1", network.client_address)
            options = {"backend": "ec2", "endpoint_url": endpoint, "image": ami,
                       "subnet_id": subnet["Subnet"]["SubnetId"], "ssh_user": "root",
                       "client_cidr": f"{network.client_address}/32",
                       "index_url": package_index.url(network.client_address),
                       "engines_per_instance": 1, "lease": 3.0,
                       "idle_timeout": 4.0, "price_per_hour": 0.1}
            yield api, vms, options
        assert vms.errors == []


@pytest.fixture
def fake_arm(monkeypatch):
    """Azure Resource Manager replayed (tests/fake_arm.py), behind the SDK clients of
    cloudlab's Azure backend in this process."""
    from fake_arm import ArmTransport, Credential, FakeArm

    from cloudlab.backends.azure import Azure

    fake = FakeArm([f"198.51.100.{i}" for i in range(10, 60)])
    monkeypatch.setattr(Azure, "connection", {"transport": ArmTransport(fake),
                                              "credential": Credential()})
    return fake


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def test_hosts(tmp_path_factory, host_homes):
    """Two network-namespace hosts with sshd (tests/hosts.py), removed afterwards. Neither
    has the client's Python packages, checkout or venv; the first shares the rest of the
    client's filesystem (its /tmp, say); the second has its own cloudlab runtime folder too,
    where the files engines read must be copied to."""
    from cloudlab.security import runtime_dir
    from hosts import HostNetwork, missing

    why = missing()
    if why:
        pytest.skip(f"test hosts cannot be built here: {why}")
    with HostNetwork(2, tmp_path_factory.mktemp("hosts"), private={1: runtime_dir()},
                     homes=host_homes) as network:
        yield network
    assert not network.exists(), "the test hosts were not torn down"


@pytest.fixture(scope="module")
def test_slurm(tmp_path_factory, monkeypatch_module, host_homes):
    """A Slurm cluster of two network-namespace nodes (tests/slurm.py), SLURM_CONF pointing
    at it, and ``env_dir`` for cloudlab's environment on its nodes; everything stopped and
    removed afterwards."""
    from slurm import SlurmCluster
    from slurm import missing as slurm_missing

    from hosts import HostNetwork
    from hosts import missing as hosts_missing

    why = hosts_missing() or slurm_missing()
    if why:
        pytest.skip(f"a Slurm test cluster cannot be built here: {why}")
    folder = tmp_path_factory.mktemp("slurm")
    with HostNetwork(2, folder / "hosts") as network, \
            SlurmCluster(network, folder / "slurm") as slurm:
        monkeypatch_module.setenv("SLURM_CONF", str(slurm.conf))
        # Where the tests keep cloudlab's environments in the nodes' shared home (not the
        # real home's cache): one for the test run, as a cluster's home keeps it.
        slurm.env_dir = host_homes / "slurm-envs"
        yield slurm
    assert not network.exists(), "the Slurm test nodes were not torn down"


@pytest.fixture
def write_profile():
    """``write(name, cloud_options, **top_level)``: a cloud profile (EC2 unless the options
    say ``backend``) in the test's CLOUDLAB_HOME (for the `cloudlab` commands the tests run),
    removed after the test."""
    written = []

    def write(name: str, options: dict, **top) -> str:
        backend = options.get("backend", "ec2")
        table = {k: v for k, v in options.items() if k != "backend"}
        lines = [f'backend = "{backend}"', *(f"{k} = {json.dumps(v)}" for k, v in top.items()),
                 "", f"[{backend}]", *(f"{k} = {json.dumps(v)}" for k, v in table.items())]
        folder = Path(os.environ["CLOUDLAB_HOME"]) / "profiles"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.toml"
        path.write_text("\n".join(lines) + "\n")
        written.append(path)
        return name

    yield write
    for path in written:
        path.unlink(missing_ok=True)

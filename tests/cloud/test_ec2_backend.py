"""The EC2 backend end to end, offline: moto_server is the EC2 API, and every instance it
starts boots as a network-namespace host running the rendered user-data for real
(tests/cloud_vms.py). Engines of both kinds start there, work, and are gone with their
instances at stop; after kill -9 of the client, or a start killed half way, `gc` leaves
no instance running and no security group behind."""

import sys

import pytest

import cloudlab
from cloudlab.backends import _vm
from cloudlab.backends.ec2 import Ec2, Ec2Options
from cloudlab.widgets.status import snapshot, summary_line
from conftest import wait_until_gone


@pytest.fixture(scope="module")
def cloud(moto_endpoint, tmp_path_factory):
    """moto's EC2 with a VPC whose subnet is a host network's /24, and VMs playing its
    instances; yields the options a profile would give."""
    from cloud_vms import FakeVms

    from hosts import HostNetwork, missing

    why = missing()
    if why:
        pytest.skip(f"test VMs cannot be built here: {why}")
    api = Ec2(Ec2Options(endpoint_url=moto_endpoint))
    ami = api.client.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
    with HostNetwork(0, tmp_path_factory.mktemp("vms")) as network:
        vpc = api.client.create_vpc(CidrBlock="10.77.0.0/16")["Vpc"]["VpcId"]
        subnet = api.client.create_subnet(VpcId=vpc, CidrBlock=f"{network.subnet}.0/24")
        with FakeVms(network, api.client, tmp_path_factory.mktemp("fake")) as vms:
            options = {"backend": "ec2", "endpoint_url": moto_endpoint, "image": ami,
                       "subnet_id": subnet["Subnet"]["SubnetId"], "ssh_user": "root",
                       "client_cidr": f"{network.client_address}/32", "install": "",
                       "python": sys.executable, "engines_per_instance": 1, "lease": 3.0,
                       "idle_timeout": 4.0, "price_per_hour": 0.1}
            yield api, vms, options
        assert vms.errors == []


def _running(api) -> list:
    return [vm for vm in api.cloudlab_instances() if vm.state in ("pending", "running")]


def test_engines_start_on_instances_that_booted_from_their_user_data(cloud, engine):
    api, vms, options = cloud
    with cloudlab.Cluster(4, engine=engine, **options) as c:
        assert c.map(lambda x: x * x, range(16)) == [x * x for x in range(16)]
        ours = [vm for vm in _running(api) if vm.tags[_vm.TAG_CLUSTER] == c.name]
        assert len(ours) == 4 and all(vm.id in vms.booted for vm in ours)
        where = c.run(lambda: __import__("os").readlink("/proc/self/ns/net"))
        assert len(set(where.values())) == 4  # one engine on each instance
        line = summary_line(snapshot(c))
        assert "4 VMs, $0.40/h" in line, line
    assert wait_until_gone(c.name, 10) == []
    assert [vm for vm in _running(api) if vm.tags[_vm.TAG_CLUSTER] == c.name] == []
    assert api.cloudlab_groups() == [] and api.cloudlab_key_pairs() == []

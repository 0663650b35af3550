"""A cluster's AWS resources through the real EC2 API of moto_server on loopback: key pair,
security group and instances created with their tags, rules and expiry; all of it deleted
after a start that fails half way; `gc` removing what is expired or orphaned and nothing
else; and the refusals moto cannot produce (capacity, quota), through botocore's Stubber."""

import base64

import pytest
from botocore.stub import Stubber

from cloudlab.backends import _vm
from cloudlab.backends.ec2 import Ec2, Ec2Options, collect_garbage
from cloudlab.errors import StartError

PUBLIC_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGTpc2bpvJeQW4Ib3N0G0N7GH7r8mnzt3w5t/vSxn/4o"
CLIENT = "203.0.113.7/32"


@pytest.fixture
def ec2(moto_endpoint):
    ami = Ec2(Ec2Options(endpoint_url=moto_endpoint)).client.describe_images(
        Owners=["amazon"])["Images"][0]["ImageId"]
    api = Ec2(Ec2Options(endpoint_url=moto_endpoint, image=ami))
    yield api
    collect_garbage(api, live_clusters=set())  # nothing of a test outlives it


def _user_data(cluster="c1"):
    return _vm.render_bootstrap(_vm.Bootstrap(cluster, "true", 900, 8, "echo i-1"))


def _instances(api, cluster):
    return [vm for vm in api.cloudlab_instances() if vm.tags[_vm.TAG_CLUSTER] == cluster]


def test_a_cluster_gets_a_key_a_guarded_group_and_tagged_self_deleting_instances(ec2):
    created = ec2.create("res-1", 2, PUBLIC_KEY, _user_data("res-1"), CLIENT)
    vms = _instances(ec2, "res-1")
    assert sorted(vm.id for vm in vms) == sorted(created.instances) and len(vms) == 2
    for vm in vms:
        assert vm.tags[_vm.TAG_OWNER] == _vm.owner() and vm.tags["Name"] == "cloudlab-res-1"
        assert not _vm.expired(vm.tags[_vm.TAG_EXPIRES])
        attribute = ec2.client.describe_instance_attribute
        behaviour = attribute(InstanceId=vm.id, Attribute="instanceInitiatedShutdownBehavior")
        assert behaviour["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
        data = base64.b64decode(attribute(InstanceId=vm.id, Attribute="userData")["UserData"]
                                ["Value"]).decode()
        assert data == _user_data("res-1")
        assert "PRIVATE KEY" not in data and "aws_secret" not in data.lower()
    group = ec2.client.describe_security_groups(GroupIds=[created.group_id])["SecurityGroups"][0]
    rules = group["IpPermissions"]
    assert len(rules) == 2
    ssh = next(r for r in rules if r["IpProtocol"] == "tcp")
    assert (ssh["FromPort"], ssh["ToPort"]) == (22, 22)
    assert [r["CidrIp"] for r in ssh["IpRanges"]] == [CLIENT]  # the client's /32, no one else
    inside = next(r for r in rules if r["IpProtocol"] == "-1")
    assert inside["IpRanges"] == [] and [p["GroupId"] for p in inside["UserIdGroupPairs"]] == \
        [created.group_id]  # the cluster's own instances only
    assert [k["KeyName"] for k in ec2.cloudlab_key_pairs()] == ["cloudlab-res-1"]

    ec2.delete(created)
    assert _instances(ec2, "res-1") == []
    assert ec2.cloudlab_groups() == [] and ec2.cloudlab_key_pairs() == []


def test_spot_instances_are_asked_for_with_the_max_price(moto_endpoint, ec2):
    spot = Ec2(Ec2Options(endpoint_url=moto_endpoint, image=ec2.options.image, spot=True,
                          max_price=0.05))
    created = spot.create("res-spot", 1, PUBLIC_KEY, _user_data(), CLIENT)
    reply = spot.client.describe_instances(InstanceIds=created.instances)
    assert reply["Reservations"][0]["Instances"][0]["InstanceLifecycle"] == "spot"
    spot.delete(created)


def test_a_start_that_fails_half_way_leaves_nothing(ec2, monkeypatch):
    real = ec2.client.run_instances

    def started_then_interrupted(**arguments):
        real(**arguments)  # the instances exist, but their ids never reach us
        raise KeyboardInterrupt

    monkeypatch.setattr(ec2.client, "run_instances", started_then_interrupted)
    with pytest.raises(KeyboardInterrupt):
        ec2.create("res-half", 3, PUBLIC_KEY, _user_data(), CLIENT)
    assert _instances(ec2, "res-half") == []  # found by their tag, and terminated
    assert ec2.cloudlab_groups() == [] and ec2.cloudlab_key_pairs() == []


@pytest.mark.parametrize("code, sentence", [
    ("InsufficientInstanceCapacity", "AWS has no capacity for 4 x c7i.large in us-east-1 right "
     "now: try another instance_type, another region, or a subnet_id in another availability "
     "zone."),
    ("VcpuLimitExceeded", "Your vCPU quota in us-east-1 is too small for 4 x c7i.large in "
     "us-east-1: ask for more in the Service Quotas console, or start fewer engines."),
])
def test_capacity_and_quota_refusals_are_one_sentence_and_leave_nothing(ec2, code, sentence):
    stubber = Stubber(ec2.client)
    real = ec2.client.run_instances
    stubber.add_client_error("run_instances", service_error_code=code, http_status_code=400)
    # Only run_instances is stubbed: the key pair and group are created for real first.
    stub = ec2.client.run_instances

    def refused(**arguments):
        with stubber:
            return stub(**arguments)

    ec2.client.run_instances = refused
    try:
        with pytest.raises(StartError) as error:
            ec2.create("res-refused", 4, PUBLIC_KEY, _user_data(), CLIENT)
    finally:
        ec2.client.run_instances = real
    assert str(error.value) == sentence
    assert ec2.cloudlab_groups() == [] and ec2.cloudlab_key_pairs() == []
    assert ec2.role.clusters() == {}


def test_gc_removes_expired_and_orphaned_resources_and_nothing_else(ec2, monkeypatch):
    running = ec2.create("gc-running", 1, PUBLIC_KEY, _user_data(), CLIENT)
    orphan = ec2.create("gc-orphan", 1, PUBLIC_KEY, _user_data(), CLIENT)
    monkeypatch.setattr(_vm, "owner", lambda: "bob@elsewhere")  # another machine's clusters
    elsewhere = ec2.create("gc-elsewhere", 1, PUBLIC_KEY, _user_data(), CLIENT)
    monkeypatch.setattr(_vm, "expires_at", lambda hours, now=None: "2020-01-01T00:00:00Z")
    expired = ec2.create("gc-expired", 1, PUBLIC_KEY, _user_data(), CLIENT)
    monkeypatch.undo()

    live = {"gc-running"}
    listed = collect_garbage(ec2, live, dry_run=True)
    assert len(_instances(ec2, "gc-expired")) == 1  # a dry run deletes nothing
    assert sorted(line.split(":")[0] for line in listed) == sorted(
        [f"instance {orphan.instances[0]} (running, cluster gc-orphan)",
         f"instance {expired.instances[0]} (running, cluster gc-expired)",
         f"security group {orphan.group_id} (cloudlab-gc-orphan)",
         f"security group {expired.group_id} (cloudlab-gc-expired)",
         "key pair cloudlab-gc-orphan", "key pair cloudlab-gc-expired",
         "instance role cloudlab-gc-orphan", "instance role cloudlab-gc-expired"])
    assert any("expired at 2020-01-01T00:00:00Z" in line for line in listed)
    assert any("its cluster gc-orphan no longer runs on this machine" in line for line in listed)

    assert sorted(collect_garbage(ec2, live)) == sorted(listed)
    left = {vm.tags[_vm.TAG_CLUSTER] for vm in ec2.cloudlab_instances()}
    assert left == {"gc-running", "gc-elsewhere"}
    assert set(ec2.role.clusters()) == {"gc-running", "gc-elsewhere"}
    assert collect_garbage(ec2, live) == []
    ec2.delete(running)
    ec2.delete(elsewhere)

"""The EC2 backend end to end, offline: moto_server is the EC2 API, and every instance it
starts boots as a network-namespace host running the rendered user-data for real
(tests/cloud_vms.py). Engines of both kinds start there, work, and are gone with their
instances at stop; after kill -9 of the kernel, or a start killed half way, `gc` leaves
no instance running and no security group behind."""

import base64
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

import cloudlab
from cloudlab.backends import _vm
from cloudlab.backends.ec2 import Ec2Options
from cloudlab.widgets.status import snapshot, summary_line
from conftest import wait_until_gone


def _running(api) -> list:
    return [vm for vm in api.cloudlab_instances() if vm.state in ("pending", "running")]


def test_engines_start_on_instances_that_booted_from_their_user_data(ec2_cloud, engine):
    api, vms, options = ec2_cloud
    # The repository's aws-cpu profile, pointed at moto and the test's subnet.
    overrides = {k: v for k, v in options.items() if k != "backend"}
    with cloudlab.Cluster(4, engine=engine, profile="aws-cpu", **overrides) as c:
        assert c.map(lambda x: x * x, range(16)) == [x * x for x in range(16)]
        ours = [vm for vm in _running(api) if vm.tags[_vm.TAG_CLUSTER] == c.name]
        assert len(ours) == 4 and all(vm.id in vms.booted for vm in ours)
        # The client reaches the controller only through SSH tunnels (the security group
        # lets nothing else in from outside).
        peers = {conn.raddr.ip for conn in psutil.Process().net_connections("tcp")
                 if conn.raddr and conn.status == "ESTABLISHED"}
        assert not peers & {vm.private_ip for vm in ours}
        where = c.run(lambda: __import__("os").readlink("/proc/self/ns/net"))
        assert len(set(where.values())) == 4  # one engine on each instance
        line = summary_line(snapshot(c))
        assert "4 VMs, $0.40/h" in line, line
        # What EC2 stored as each instance's user-data holds no key and no credential.
        secrets = [os.environ["AWS_SECRET_ACCESS_KEY"], os.environ["AWS_ACCESS_KEY_ID"],
                   (c._backend.workdir / "vm_key").read_text().splitlines()[1]]
        for vm in ours:
            data = api.client.describe_instance_attribute(InstanceId=vm.id, Attribute="userData")
            script = base64.b64decode(data["UserData"]["Value"]).decode()
            assert script.startswith("#!/bin/bash\n# cloudlab bootstrap")
            assert "PRIVATE KEY" not in script and not any(x in script for x in secrets)
    assert wait_until_gone(c.name, 10) == []
    assert [vm for vm in _running(api) if vm.tags[_vm.TAG_CLUSTER] == c.name] == []
    assert api.cloudlab_groups() == [] and api.cloudlab_key_pairs() == []
    assert api.role.clusters() == {}  # (its instance role)


def _client(options, n: int) -> subprocess.Popen:
    from cloud_vms import client_process

    return client_process(options, n)


def _gc(profile: str) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "cloudlab.cli", "gc", "--profile", profile],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _ours(api, name) -> list:
    return [vm for vm in _running(api) if vm.tags[_vm.TAG_CLUSTER] == name]


def test_after_kill_9_of_the_kernel_gc_leaves_nothing(ec2_cloud, write_profile):
    """A real Jupyter kernel starts the cluster with the profile, then is killed with -9."""
    from jupyter_client.manager import start_new_kernel

    from kernels import execute

    api, vms, options = ec2_cloud
    profile = write_profile("moto-ec2", options)
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        execute(client, "%load_ext cloudlab")
        execute(client, f"%cluster start 2 --profile {profile}")
        name = execute(client, "print(cluster.name)").strip()
        assert len(_ours(api, name)) == 2
        os.kill(manager.provisioner.process.pid, signal.SIGKILL)  # no atexit, no cleanup
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)
    out = _gc(profile)
    assert sum(f"cluster {name}): its cluster {name} no longer runs on this machine" in line
               for line in out) == 2, out
    assert any(line.startswith("deleted in us-east-1: security group ") for line in out)
    assert _ours(api, name) == []
    assert api.cloudlab_groups() == [] and api.cloudlab_key_pairs() == []
    assert wait_until_gone(name, 10) == []


def test_after_a_start_killed_half_way_gc_leaves_nothing(ec2_cloud, write_profile):
    api, vms, options = ec2_cloud
    client = _client(options, 3)
    try:
        name = client.stdout.readline().split()[1]
        deadline = time.monotonic() + 60
        while not _ours(api, name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _ours(api, name), "no instance was started"
        client.send_signal(signal.SIGKILL)  # while its instances boot
        client.wait(10)
    finally:
        client.kill()
    _gc(write_profile("moto-ec2", options))
    assert _ours(api, name) == []
    assert api.cloudlab_groups() == [] and api.cloudlab_key_pairs() == []


@pytest.mark.parametrize("moment", ["instances booting", "engines starting"])
def test_ctrl_c_during_a_start_deletes_what_it_created_before_exiting(ec2_cloud,
                                                                      write_profile, moment):
    """`cloudlab start` interrupted (SIGINT, as Ctrl-C sends) at a moment of its start: one
    sentence, and by the time the process has exited nothing it created is left."""
    api, vms, options = ec2_cloud
    name = f"ctrl-c-{moment.split()[0]}"
    start = subprocess.Popen([sys.executable, "-m", "cloudlab.cli", "start", "2", "--profile",
                              write_profile("moto-ec2", options), "--name", name],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            ours = _ours(api, name)
            if ours and (moment == "instances booting" or
                         all(vm.id in vms.booted for vm in ours)):
                break
            time.sleep(0.05)
        assert ours, f"no instance of {name} came to be {moment}"
        if moment == "engines starting":
            time.sleep(0.5)  # (the environment on each VM is being checked or installed)
        start.send_signal(signal.SIGINT)
        out, err = start.communicate(timeout=150)
    finally:
        start.kill()
    assert start.returncode == 130
    assert err.strip() == (f"{name}: start interrupted; everything it had started or created "
                           f"is stopped and deleted."), err
    assert _ours(api, name) == []
    assert not [g for g in api.cloudlab_groups() if name in str(g)]
    assert not [k for k in api.cloudlab_key_pairs() if name in str(k)]


def test_a_kernel_interrupt_during_a_start_deletes_what_it_created(ec2_cloud, write_profile):
    """Kernel > Interrupt while the cell's VMs boot: the cell ends in one sentence, and by
    then nothing the start created is left."""
    import threading

    from jupyter_client.manager import start_new_kernel

    from kernels import execute

    api, vms, options = ec2_cloud
    name = "kernel-interrupted"
    manager, client = start_new_kernel(kernel_name="python3")
    try:
        execute(client, "%load_ext cloudlab")
        ended: list = []
        cell = threading.Thread(target=lambda: ended.append(_ends(execute, client, (
            f"%cluster start 2 --profile {write_profile('moto-ec2', options)} --name {name}"))))
        cell.start()
        deadline = time.monotonic() + 120
        while not _ours(api, name) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _ours(api, name), "no instance was started"
        manager.interrupt_kernel()
        cell.join(200)
        # IPython shows a UsageError as its one line, on the cell's stderr.
        assert ended == [f"Starting 2 ipyparallel engines on ec2...\nUsageError: {name}: start "
                         f"interrupted; everything it had started or created is stopped and "
                         f"deleted.\n"], ended
        assert _ours(api, name) == []
        assert name not in api.role.clusters()
        assert not [g for g in api.cloudlab_groups() if name in str(g)]
        assert execute(client, "print(1 + 1)").strip() == "2"  # the kernel goes on
    finally:
        client.stop_channels()
        manager.shutdown_kernel(now=True)


def _ends(execute, client, code: str):
    try:
        return execute(client, code, timeout=300)
    except Exception as e:
        return e


def test_an_idle_vm_deletes_itself(ec2_cloud, write_profile):
    """The VM's own expiry, without any client: its engines gone, it powers itself off
    idle_timeout later, and (started with shutdown behaviour "terminate") is deleted."""
    api, vms, options = ec2_cloud
    client = _client(options, 1)
    try:
        name = client.stdout.readline().split()[1]
        assert client.stdout.readline().strip() == "started"
        client.send_signal(signal.SIGKILL)
        client.wait(10)
        killed = time.monotonic()
        while _ours(api, name) and time.monotonic() - killed < 30:
            time.sleep(0.2)
        waited = time.monotonic() - killed
    finally:
        client.kill()
    assert _ours(api, name) == [], "the instance outlived its idle timeout"
    assert options["idle_timeout"] - 1 <= waited <= options["idle_timeout"] + 10
    _gc(write_profile("moto-ec2", options))  # (its security group and key pair)
    assert api.cloudlab_groups() == [] and api.cloudlab_key_pairs() == []


def test_a_lost_vm_is_a_classified_death_and_its_engine_returns_on_a_new_vm(ec2_cloud):
    api, vms, options = ec2_cloud
    with cloudlab.Cluster(2, **options) as c:
        before = {vm.id for vm in _ours(api, c.name)}
        victim = next(vm for vm in _ours(api, c.name) if vm.private_ip == c._members.processes[1].host)
        # As AWS does when it takes a spot instance back: the instance goes, engine and all.
        api.client.terminate_instances(InstanceIds=[victim.id])
        deadline = time.monotonic() + 30
        while c.death_of(1) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.death_of(1) is not None, (c.deaths, c.status(), vms.errors,
                                           c._members.not_replaced)
        assert c.death_of(1).cause.startswith(f"lost its VM {victim.id}, which was terminated "
                                              f"(Client.UserInitiatedShutdown")
        c.wait_for_engines(2, timeout=60)
        after = {vm.id for vm in _ours(api, c.name)}
        assert victim.id not in after and len(after - before) == 1  # a new VM took its place
        assert c.map(lambda x: x * 3, range(8)) == [x * 3 for x in range(8)]
        hosts = {p.host for p in c._members.processes.values()}
        assert victim.private_ip not in hosts and len(hosts) == 2
    assert _ours(api, c.name) == []


def test_a_spot_interruption_is_named_as_such():
    from types import SimpleNamespace

    from cloudlab.backends.ec2 import Ec2Backend, Vm

    backend = Ec2Backend(Ec2Options(), "spot-1")
    gone = Vm("i-0spot", "terminated", "10.0.0.9", None, 0.0,
              "Server.SpotInstanceTermination: Spot instance termination")
    backend.cloud = SimpleNamespace(describe=lambda ids: [gone])
    backend._vms = {"i-0spot": gone}
    backend._ssh = SimpleNamespace(hosts=[])
    assert backend.why_gone("i-0spot") == (
        "lost its spot instance i-0spot: AWS took it back (Server.SpotInstanceTermination: "
        "Spot instance termination)")
    assert backend._vms == {}  # it takes no more engines


def test_the_classifier_runs_unchanged_on_the_vms(ec2_cloud, write_profile):
    """`cloudlab run classify` on VMs that share nothing with the client: one row per
    document (the model and corpus are pushed, not read from the client's files)."""
    import json

    api, vms, options = ec2_cloud
    done = subprocess.run([sys.executable, "-m", "cloudlab.cli", "run", "classify",
                           "--engines", "2", "--limit", "3000", "--profile",
                           write_profile("moto-ec2", options), "--json"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["backend"] == "ec2" and figures["workers"] == 2
    assert figures["documents"] == figures["rows"] == 3000 and figures["accuracy"] > 0.75
    assert _running(api) == []  # its VMs went with it


def test_the_queue_form_works_the_clusters_own_queue_by_the_instances_role(ec2_cloud, corpus):
    """The classifier's queue form on VMs: an SQS queue and a DynamoDB table made for the
    run, which the engines use with their instance role's credentials (from the metadata
    service), never the client's. moto does not enforce IAM policies, so the policy itself
    is checked: this cluster's queues and tables only."""
    import boto3

    from cloudlab.backends import ec2_role
    from cloudlab.workloads import classify

    api, vms, options = ec2_cloud
    endpoint = options["endpoint_url"]
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    sqs = boto3.client("sqs", endpoint_url=endpoint, region_name="us-east-1")
    with cloudlab.Cluster(2, **options) as c:
        role = iam.get_role(RoleName=f"cloudlab-{c.name}")["Role"]
        assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {
            "Service": "ec2.amazonaws.com"}
        policy = iam.get_role_policy(RoleName=role["RoleName"], PolicyName=ec2_role.POLICY)
        assert policy["PolicyDocument"]["Statement"][0]["Resource"] == [
            f"arn:aws:sqs:us-east-1:*:cloudlab-{c.name}-*",
            f"arn:aws:dynamodb:us-east-1:*:table/cloudlab-{c.name}-*"]

        def credentials():
            import os

            import boto3

            return (sorted(k for k in os.environ if k.startswith("AWS_")),
                    boto3.Session().get_credentials().method)

        assert list(c.run(credentials).values()) == [([], "iam-role")] * 2
        run = classify.run_corpus(c, corpus[:3000], mode="queue")
        assert run.documents == run.rows == 3000 and len(run.workers) == 2
        assert run.accuracy > 0.75
        # The run's queue and table went with it.
        assert sqs.list_queues(QueueNamePrefix=f"cloudlab-{c.name}-").get("QueueUrls", []) == []
    assert api.role.clusters() == {}
    assert iam.list_instance_profiles(PathPrefix="/cloudlab/")["InstanceProfiles"] == []


def test_cloudlab_run_ring_spans_the_vms_with_mpirun_on_the_first(ec2_cloud, write_profile):
    """--mpi on VMs that cannot reach the client: mpirun runs on the first VM (Open MPI from
    the bootstrap, the cluster's key copied there), one rank per VM, the hop measured."""
    import json

    api, vms, options = ec2_cloud
    subnet = options["client_cidr"].rsplit(".", 1)[0] + ".0/24"
    # The test VMs share a hostname and /dev/shm (TESTING.md): TCP only, on their network.
    mpi_args = ["--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", subnet,
                "--mca", "oob_tcp_if_include", subnet]
    done = subprocess.run([sys.executable, "-m", "cloudlab.cli", "run", "ring", "--ranks", "2",
                           "--profile", write_profile("moto-ec2-mpi", {**options,
                                                                      "mpi_args": mpi_args}),
                           "--json"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert figures["backend"] == "ec2" and figures["ranks"] == 2 and figures["went_around"]
    assert all(us > 0 for us in figures["latency_us"])
    assert _running(api) == []  # its VMs went with it

"""The Azure backend end to end, offline: the real SDK clients talk to the replayed Resource
Manager of tests/fake_arm.py, and every VM it creates boots as a network-namespace host
running the rendered custom data for real (tests/cloud_vms.py), with Azure's instance
metadata service and a managed identity. Engines of both kinds start there, work, and are
gone with their VMs at stop; an idle VM deletes itself through its identity (and, without
that right, is left stopped, still billed, for gc); after kill -9 of the client, gc leaves
no resource group behind; a VM Azure takes away is a classified death, replaced."""

import shutil
import time
from pathlib import Path

import psutil
import pytest

import cloudlab
from cloudlab.backends import _vm
from cloudlab.backends.azure import Azure, AzureBackend, AzureOptions, collect_garbage
from cloudlab.widgets.status import snapshot, summary_line
from conftest import wait_until_gone

TESTS = Path(__file__).resolve().parents[1]
SUBSCRIPTION = "11111111-2222-3333-4444-555555555555"
KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheTestsOnly cloudlab-test"


@pytest.fixture(scope="module")
def azure(tmp_path_factory, monkeypatch_module, package_index, host_homes):
    """The replayed Resource Manager, served to this process through the SDK's transport
    and to the VMs over HTTP; VMs playing Azure's; the options a profile would give."""
    from cloud_vms import AzureVms
    from fake_arm import ArmTransport, Credential, FakeArm

    from hosts import HostNetwork, missing

    why = missing() or (shutil.which("curl") is None and
                        "curl is missing (Debian package curl): the bootstrap uses it")
    if why:
        pytest.skip(f"test VMs cannot be built here: {why}")
    with HostNetwork(0, tmp_path_factory.mktemp("azure-vms"), homes=host_homes / "vms",
                     shared_home=True) as network:
        vms = AzureVms(network, tmp_path_factory.mktemp("azure-fake"), "")
        # Public addresses: the upper end of the host network (a VM's host answers at both).
        arm = FakeArm([f"{network.subnet}.{i}" for i in range(200, 250)],
                      on_vm=vms.created, on_vm_gone=vms.deleted)
        server, vms.arm_url = arm.serve(network.client_address)
        monkeypatch_module.setattr(Azure, "connection", {"transport": ArmTransport(arm),
                                                         "credential": Credential()})
        options = {"backend": "azure", "subscription_id": SUBSCRIPTION,
                   "address_prefix": f"{network.subnet}.0/24", "ssh_user": "root",
                   "client_cidr": f"{network.client_address}/32",
                   "index_url": package_index.url(network.client_address),
                   "engines_per_instance": 1, "lease": 3.0,
                   "idle_timeout": 4.0, "price_per_hour": 0.1}
        try:
            with vms:
                yield arm, vms, options
        finally:
            server.shutdown()
        assert vms.errors == []


def _vms_of(arm, cluster: str) -> list[dict]:
    return [r for r in arm.resources.values() if r["type"].endswith("virtualMachines")
            and r["tags"][_vm.TAG_CLUSTER] == cluster]


def test_engines_start_on_vms_that_booted_from_their_custom_data(azure, engine):
    arm, vms, options = azure
    overrides = {k: v for k, v in options.items() if k != "backend"}
    with cloudlab.Cluster(2, engine=engine, profile="azure", **overrides) as c:
        assert c.map(lambda x: x + 1, range(10)) == list(range(1, 11))
        ours = _vms_of(arm, c.name)
        assert len(ours) == 2 and all(vm["id"].lower() in vms.booted for vm in ours)
        where = c.run(lambda: __import__("os").readlink("/proc/self/ns/net"))
        assert len(set(where.values())) == 2  # one engine on each VM
        # The client (this process and its ssh children) reaches the VMs at their public
        # addresses, over SSH only: the controller's ports go through the tunnel.
        described = c._backend.describe([v["name"] for v in ours])
        public = {vm.public_ip for vm in described}
        private = {vm.private_ip for vm in described}
        me = psutil.Process()
        peers = {(conn.raddr.ip, conn.raddr.port)
                 for process in [me, *me.children(recursive=True)]
                 for conn in process.net_connections("tcp")
                 if conn.raddr and conn.status == "ESTABLISHED"}
        to_vms = {peer for peer in peers if peer[0] in public | private}
        assert to_vms and all(ip in public and port == 22 for ip, port in to_vms), to_vms
        line = summary_line(snapshot(c))
        assert "2 VMs, $0.20/h" in line, line
    assert wait_until_gone(c.name, 10) == []
    assert f"cloudlab-{c.name}" not in arm.groups and _vms_of(arm, c.name) == []
    assert _hosts_gone(vms, ours)


def test_the_workloads_run_unchanged_on_the_vms(azure):
    """pi, the classifier and a pCT reconstruction as `cloudlab run` runs them, on one
    cluster of VMs that share nothing with the client (inputs travel as values). The
    queue form has no queue the VMs reach here (no AWS role, no route to the client):
    one sentence, before any training."""
    import math

    from workload_runs import run_workload as run

    arm, vms, options = azure
    with cloudlab.Cluster(2, engine="dask", **options) as c:
        figures = run(c, "pi", "--samples", "1e8")
        assert abs(figures["estimate"] - math.pi) < 5 * figures["stderr"]
        figures = run(c, "classify", "--limit", "2000")
        assert figures["documents"] == figures["rows"] == 2000 and figures["accuracy"] > 0.7
        assert figures["workers"] == 2
        figures = run(c, "pct", "--size", "small")
        assert figures["max_insert_error_pct"] <= 1.0 and figures["rmse"] <= 0.040
        # The queue form: the VMs reach this machine's Redis through SSH forwards only.
        figures = run(c, "classify", "--limit", "2000", "--mode", "queue")
        assert figures["documents"] == figures["rows"] == 2000 and figures["workers"] == 2
    assert wait_until_gone(c.name, 10) == []


def _hosts_gone(vms, resources: list[dict], timeout: float = 10) -> bool:
    """Whether the hosts playing these VMs are removed (as soon as their deletion is seen)."""
    deadline = time.monotonic() + timeout
    while any(r["id"].lower() in vms.hosts for r in resources):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _lonely_vm(arm, options: dict, name: str, self_delete: bool):
    """One VM created as a cluster would, but with no client ever: its bootstrap's idle
    expiry is all that acts on it."""
    fields = {k: v for k, v in options.items() if k in AzureOptions.__dataclass_fields__}
    backend = AzureBackend(AzureOptions(**{**fields, "self_delete": self_delete}), name)
    script = _vm.render_bootstrap(_vm.Bootstrap(
        name, "", idle_timeout=2, max_hours=1, instance_id_command=backend.instance_id_command,
        check_every=0.5, boot_grace=1, on_expiry=backend.on_expiry()))
    api = Azure(backend.options)
    return api, api.create(name, 1, KEY, script, options["client_cidr"])


def test_an_idle_vm_deletes_itself_through_its_identity(azure):
    arm, vms, options = azure
    api, created = _lonely_vm(arm, options, "ipp-idle1", self_delete=True)
    [vm] = _vms_of(arm, "ipp-idle1")
    deadline = time.monotonic() + 30
    while _vms_of(arm, "ipp-idle1") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _vms_of(arm, "ipp-idle1") == [], "the VM outlived its idle timeout"
    # It was its own identity that deleted it (the client's token was not used).
    deletes = [(path, who) for method, path, who in arm.requests
               if method == "DELETE" and "ipp-idle1" in path]
    assert deletes == [(vm["id"], "identity")]
    assert _hosts_gone(vms, [vm])
    # Its disk, interface and address went with it; the group (free) waits for gc.
    assert [r["type"] for r in arm.resources.values() if "ipp-idle1" in r["id"]] == [
        "Microsoft.Network/networkSecurityGroups", "Microsoft.Network/virtualNetworks"]
    assert collect_garbage(api, set()) == [
        "resource group cloudlab-ipp-idle1 (cluster ipp-idle1): its cluster ipp-idle1 no "
        "longer runs on this machine"]
    assert "cloudlab-ipp-idle1" not in arm.groups


def test_without_self_delete_an_idle_vm_is_left_stopped_for_gc(azure):
    arm, vms, options = azure
    api, created = _lonely_vm(arm, options, "ipp-idle2", self_delete=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        [found] = api.describe(created.instances, created)
        if found.state == "stopped":
            break
        time.sleep(0.2)
    assert found.state == "stopped"  # powered off from inside: on Azure, still billed
    collect_garbage(api, set())
    assert "cloudlab-ipp-idle2" not in arm.groups and _vms_of(arm, "ipp-idle2") == []


def test_after_kill_9_of_the_client_gc_leaves_nothing(azure, write_profile, capsys):
    arm, vms, options = azure
    from cloud_vms import killed_after_start

    def two_vms(name):
        assert len(_vms_of(arm, name)) == 2

    name = killed_after_start(options, 2, two_vms, prelude=(
        f"import sys; sys.path.insert(0, {str(TESTS)!r})\n"
        "from fake_arm import Credential, ForwardTransport\n"
        "from cloudlab.backends.azure import Azure\n"
        f"Azure.connection = {{'transport': ForwardTransport({vms.arm_url!r}), "
        "'credential': Credential()}"))
    from cloudlab.cli import main

    assert main(["gc", "--profile", write_profile("fake-azure", options)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert (f"deleted in Azure subscription {SUBSCRIPTION}: resource group cloudlab-{name} (cluster "
            f"{name}): its cluster {name} no longer runs on this machine") in out, out
    assert f"cloudlab-{name}" not in arm.groups and _vms_of(arm, name) == []
    assert wait_until_gone(name, 10) == []


def test_a_vm_azure_takes_away_is_a_classified_death_and_its_engine_returns(azure):
    arm, vms, options = azure
    with cloudlab.Cluster(2, **{**options, "spot": True}) as c:
        victim = next(vm for vm in c._backend.describe(c._backend.created.instances)
                      if vm.public_ip == c._members.processes[1].host)
        # As Azure evicts a spot VM whose eviction policy is Delete: the VM is gone.
        [resource] = [r for r in _vms_of(arm, c.name) if r["name"] == victim.id]
        arm.handle("DELETE", resource["id"], {"Authorization": "Bearer cloudlab-test-token"},
                   None)
        deadline = time.monotonic() + 30
        while c.death_of(1) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert c.death_of(1) is not None, (c.deaths, c.status(), vms.errors)
        assert c.death_of(1).cause == f"lost its spot VM {victim.id}: Azure evicted it"
        c.wait_for_engines(2, timeout=60)
        assert c.map(lambda x: x * 3, range(8)) == [x * 3 for x in range(8)]
        names = {r["name"] for r in _vms_of(arm, c.name)}
        assert victim.id not in names and len(names) == 2
    assert _vms_of(arm, c.name) == []

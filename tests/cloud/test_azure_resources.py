"""Azure's resources for a cluster, through the real SDK clients (azure-mgmt-*) whose last
hop is the replayed Resource Manager of tests/fake_arm.py: what is created, how it is
tagged and locked down, that a failure half way leaves nothing, that the errors Azure gives
become one sentence with the fix, and what `gc` deletes."""

import base64
import datetime as dt
import json

import pytest

from cloudlab.backends import _vm
from cloudlab.backends.azure import (
    VM_CONTRIBUTOR,
    Azure,
    AzureBackend,
    AzureOptions,
    collect_garbage,
    linux_price,
)
from cloudlab.errors import ConfigError, StartError

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeKeyForTheTestsOnly cloudlab-test"
SCRIPT = _vm.render_bootstrap(_vm.Bootstrap("ipp-abc123", "", 60, 1, "true"))


@pytest.fixture
def arm(fake_arm):
    return fake_arm


def _azure(**options) -> Azure:
    return Azure(AzureOptions(subscription_id="11111111-2222-3333-4444-555555555555",
                              **options))


def _of_type(arm, kind: str) -> list[dict]:
    return [r for r in arm.resources.values() if r["type"].endswith(kind)]


def test_a_cluster_is_one_tagged_resource_group_locked_down_to_its_client(arm):
    azure = _azure(location="westeurope", spot=True, max_price=0.05)
    created = azure.create("ipp-abc123", 2, KEY, SCRIPT, "203.0.113.7/32")
    assert list(arm.groups) == ["cloudlab-ipp-abc123"]
    group = arm.groups["cloudlab-ipp-abc123"]
    assert group["location"] == "westeurope"
    assert group["tags"][_vm.TAG_CLUSTER] == "ipp-abc123"
    assert group["tags"][_vm.TAG_OWNER] == _vm.owner()
    assert not _vm.expired(group["tags"][_vm.TAG_EXPIRES])
    # Every resource carries the tags, and lives in the cluster's group.
    assert len(arm.resources) == 2 + 3 * 2  # network, NSG; per VM an address, a NIC, the VM
    for resource in arm.resources.values():
        assert resource["tags"][_vm.TAG_CLUSTER] == "ipp-abc123", resource["id"]
        assert "/resourceGroups/cloudlab-ipp-abc123/" in resource["id"]
    # Inbound: SSH from the client's /32, nothing else (Azure's defaults let the VMs of
    # the network reach each other, and deny the rest).
    [nsg] = _of_type(arm, "networkSecurityGroups")
    [rule] = nsg["properties"]["securityRules"]
    assert {k: rule["properties"][k] for k in ("sourceAddressPrefix", "destinationPortRange",
                                               "access", "direction", "protocol")} == {
        "sourceAddressPrefix": "203.0.113.7/32", "destinationPortRange": "22",
        "access": "Allow", "direction": "Inbound", "protocol": "Tcp"}
    [vnet] = _of_type(arm, "virtualNetworks")
    assert vnet["properties"]["subnets"][0]["properties"]["networkSecurityGroup"]["id"] == nsg["id"]
    vms = _of_type(arm, "virtualMachines")
    assert sorted(vm["name"] for vm in vms) == created.instances == ["ipp-abc123-1", "ipp-abc123-2"]
    for vm in vms:
        p = vm["properties"]
        assert p["osProfile"]["linuxConfiguration"]["disablePasswordAuthentication"] is True
        assert p["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]["keyData"] == KEY
        assert p["priority"] == "Spot" and p["evictionPolicy"] == "Delete"
        assert p["billingProfile"] == {"maxPrice": 0.05}
        # What goes with the VM when it is deleted (by itself, or by Azure's eviction).
        assert p["storageProfile"]["osDisk"]["deleteOption"] == "Delete"
        assert p["networkProfile"]["networkInterfaces"][0]["properties"]["deleteOption"] == "Delete"
        assert vm["identity"]["type"] == "SystemAssigned"
        custom = base64.b64decode(arm.custom_data[vm["id"].lower()]).decode()
        assert custom == SCRIPT and "PRIVATE KEY" not in custom
    # Each VM's identity may manage that VM, and nothing else.
    assert len(arm.role_assignments) == 2
    for assignment, vm in zip(sorted(arm.role_assignments, key=lambda a: a["properties"]["scope"]),
                              sorted(vms, key=lambda v: v["id"].lower())):
        p = assignment["properties"]
        assert p["scope"] == vm["id"].lower()
        assert p["principalId"] == vm["identity"]["principalId"]
        assert p["roleDefinitionId"].endswith(f"/roleDefinitions/{VM_CONTRIBUTOR}")
    described = azure.describe(created.instances, created)
    assert [v.state for v in described] == ["running", "running"]  # (created side by side:)
    assert {v.private_ip for v in described} == {"10.77.0.4", "10.77.0.5"}
    assert {v.public_ip for v in described} == {"198.51.100.10", "198.51.100.11"}
    azure.delete(created)
    assert arm.groups == {} and arm.resources == {}


def test_private_only_vms_have_no_public_address_and_no_identity_without_self_delete(arm):
    azure = _azure(use_private_ip=True, self_delete=False)
    created = azure.create("dask-1", 1, KEY, SCRIPT, "10.0.0.0/8")
    assert _of_type(arm, "publicIPAddresses") == []
    [vm] = _of_type(arm, "virtualMachines")
    assert "identity" not in vm and arm.role_assignments == []
    assert "priority" not in vm["properties"]
    [found] = azure.describe(created.instances, created)
    assert found.public_ip is None and found.private_ip == "10.77.0.4"
    azure.delete(created)


def test_a_vm_that_is_gone_or_powered_off_is_described_as_such(arm):
    azure = _azure()
    created = azure.create("ipp-x", 2, KEY, SCRIPT, "203.0.113.7/32")
    [first] = [v["id"].lower() for v in _of_type(arm, "virtualMachines") if v["name"] == "ipp-x-1"]
    arm.vm_power[first] = "stopped"
    azure.terminate(["ipp-x-2"], created)
    assert [(v.id, v.state, v.reason) for v in azure.describe(created.instances, created)] == [
        ("ipp-x-1", "stopped", "PowerState/stopped"), ("ipp-x-2", "terminated", "deleted")]
    # Its network interface and address went with it.
    assert len(_of_type(arm, "networkInterfaces")) == len(_of_type(arm, "publicIPAddresses")) == 1
    azure.delete(created)
    assert azure.describe(["ipp-x-1"], created) == []  # (no group: nothing to describe)


@pytest.mark.parametrize("failure, says", [
    (("PUT", "virtualMachines/ipp-f-2", 409, "SkuNotAvailable", "The requested size for "
      "resource '...' is currently not available in location 'eastus' zones ''"),
     "Azure has no capacity for 2 x Standard_D2s_v5 in eastus right now (SkuNotAvailable): "
     "try another vm_size or another location."),
    (("PUT", "virtualMachines/ipp-f-1", 409, "OperationNotAllowed", "Operation could not be "
      "completed as it results in exceeding approved standardDSv5Family Cores quota. "
      "Additional details - Deployment Model: Resource Manager, Location: eastus, Current "
      "Limit: 10, Current Usage: 10, Additional Required: 2"),
     "Your vCPU quota in eastus is too small for 2 x Standard_D2s_v5 in eastus: ask for more "
     "(Azure portal, Quotas), or start fewer engines."),
    (("PUT", "roleAssignments", 403, "AuthorizationFailed", "The client 'alice@example.org' "
      "does not have authorization to perform action 'Microsoft.Authorization/"
      "roleAssignments/write' over scope '...'"),
     "Your Azure account may not let a VM delete itself (Microsoft.Authorization/"
     "roleAssignments/write): ask for the 'Role Based Access Control Administrator' role on "
     "the subscription, or set self_delete = false in the profile's [azure] table (expired "
     "VMs then wait for `cloudlab gc`)."),
    (("PUT", "virtualMachines/ipp-f-1", 404, "PlatformImageNotFound", "The platform image "
      "'Canonical:nope:server:latest' is not available."),
     "Image Canonical:ubuntu-24_04-lts:server:latest does not exist in eastus: set image in "
     "the profile's [azure] table (`az vm image list`)."),
])
def test_a_refused_start_says_why_in_one_sentence_and_leaves_nothing(arm, failure, says):
    arm.fail_next(*failure)
    with pytest.raises(StartError) as refused:
        _azure().create("ipp-f", 2, KEY, SCRIPT, "203.0.113.7/32")
    assert str(refused.value) == says
    assert arm.groups == {} and arm.resources == {}


def test_bad_profile_values_are_refused_before_anything_is_created(arm, monkeypatch):
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    with pytest.raises(ConfigError, match="No Azure subscription: set subscription_id"):
        Azure(AzureOptions())
    with pytest.raises(ConfigError, match="is not publisher:offer:sku:version"):
        _azure(image="ubuntu").create("ipp-i", 1, KEY, SCRIPT, "203.0.113.7/32")
    assert arm.groups == {}
    with pytest.raises(StartError, match="VM size Standard_Huge is not offered in eastus"):
        _azure(vm_size="Standard_Huge").vcpus()
    assert _azure(vm_size="Standard_D4s_v5").vcpus() == 4


def test_gc_deletes_expired_and_orphaned_groups_and_keeps_the_rest(arm):
    azure = _azure()
    mine_dead = azure.create("ipp-dead", 1, KEY, SCRIPT, "203.0.113.7/32")
    azure.create("ipp-live", 1, KEY, SCRIPT, "203.0.113.7/32")
    azure.create("ipp-other", 1, KEY, SCRIPT, "203.0.113.7/32")
    azure.create("ipp-old", 1, KEY, SCRIPT, "203.0.113.7/32")
    arm.groups["cloudlab-ipp-other"]["tags"][_vm.TAG_OWNER] = "bob@elsewhere"
    past = (dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    arm.groups["cloudlab-ipp-old"]["tags"].update({_vm.TAG_OWNER: "bob@elsewhere",
                                                   _vm.TAG_EXPIRES: past})
    # Not cloudlab's: never touched.
    arm.groups["someone-elses"] = {"id": "/subscriptions/x/resourceGroups/someone-elses",
                                   "name": "someone-elses", "location": "eastus", "tags": {}}
    live = {"ipp-live", "ipp-other"}
    said = collect_garbage(azure, live, dry_run=True)
    assert sorted(said) == [
        "resource group cloudlab-ipp-dead (cluster ipp-dead): its cluster ipp-dead no longer "
        "runs on this machine",
        f"resource group cloudlab-ipp-old (cluster ipp-old): expired at {past}"]
    assert len(arm.groups) == 5  # a dry run deletes nothing
    assert sorted(collect_garbage(azure, live)) == sorted(said)
    assert sorted(arm.groups) == ["cloudlab-ipp-live", "cloudlab-ipp-other", "someone-elses"]
    assert not any("ipp-dead" in k or "ipp-old" in k for k in arm.resources)
    assert mine_dead.group == "cloudlab-ipp-dead"
    assert collect_garbage(azure, live) == []


def test_the_expiring_vm_deletes_itself_through_its_identity():
    """The commands rendered into the bootstrap: a token of the VM's managed identity for
    Resource Manager, the VM's resource id, and a DELETE of that id (run for real on test
    VMs in test_azure_backend.py)."""
    backend = AzureBackend(AzureOptions(), "ipp-e")
    script = _vm.render_bootstrap(_vm.Bootstrap("ipp-e", "", 60, 1, AzureBackend.instance_id_command,
                                                on_expiry=backend.on_expiry()))
    assert ("metadata/identity/oauth2/token?api-version=2018-02-01&resource="
            "https%3A%2F%2Fmanagement.azure.com%2F") in script
    assert 'curl -sf -X DELETE -H "Authorization: Bearer $token" ' \
           '"https://management.azure.com$vm?api-version=2024-07-01"' in script
    quiet = AzureBackend(AzureOptions(self_delete=False), "ipp-e").on_expiry()
    assert quiet == ""


def test_the_price_is_the_linux_one_of_the_public_price_list():
    # The shape of https://prices.azure.com/api/retail/prices for one size and region.
    items = json.loads("""[
      {"retailPrice": 0.188, "unitOfMeasure": "1 Hour", "meterName": "D2s v5",
       "skuName": "D2s v5", "productName": "Virtual Machines Dsv5 Series Windows"},
      {"retailPrice": 0.0192, "unitOfMeasure": "1 Hour", "meterName": "D2s v5 Low Priority",
       "skuName": "D2s v5 Low Priority", "productName": "Virtual Machines Dsv5 Series"},
      {"retailPrice": 0.0096, "unitOfMeasure": "1 Hour", "meterName": "D2s v5 Spot",
       "skuName": "D2s v5 Spot", "productName": "Virtual Machines Dsv5 Series"},
      {"retailPrice": 0.096, "unitOfMeasure": "1 Hour", "meterName": "D2s v5",
       "skuName": "D2s v5", "productName": "Virtual Machines Dsv5 Series"}]""")
    assert linux_price(items, spot=False) == 0.096
    assert linux_price(items, spot=True) == 0.0096
    assert linux_price([], spot=False) is None

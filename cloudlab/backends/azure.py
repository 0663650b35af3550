"""Azure: the SDK calls that create, find and delete a cluster's Azure resources.

A cluster's resources live in one resource group of its own, ``cloudlab-CLUSTER``, so that
deleting the group deletes everything: a network security group (SSH from the client's own
address only; Azure's default rules let the cluster's VMs reach one another and nothing else
in), a virtual network, and per VM a public address, a network interface and the VM itself,
each tagged with its cluster, owner and expiry (:mod:`._vm`). A VM powered off from inside
is still billed on Azure, so an expiring VM deletes itself: it has a managed identity whose
only right is to manage that one VM (no credential of yours is on it), and its disk,
interface and address go with it. :meth:`Azure.create` deletes the group if any step fails;
:meth:`Azure.delete` deletes the group. The SDK's clients are azure-mgmt-compute, -network,
-resource and -authorization; credentials come from azure-identity's DefaultAzureCredential
(``az login``, environment variables, a managed identity).
"""

from __future__ import annotations

import base64
import json
import os
import threading
import time
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import ConfigError, StartError
from ..profiles import option
from . import _vm
from .ec2 import Vm

#: Ubuntu 24.04 LTS, as Canonical publishes it (publisher:offer:sku:version).
UBUNTU = "Canonical:ubuntu-24_04-lts:server:latest"
ARM = "https://management.azure.com"
#: Azure's built-in role "Virtual Machine Contributor": what a VM's identity may do to itself.
VM_CONTRIBUTOR = "9980e02c-c2be-4d73-94e8-173b1dc7cf3c"
#: Compute API version the VM uses to delete itself.
COMPUTE_API = "2024-07-01"
#: Azure's public price list (no credentials needed).
PRICES = "https://prices.azure.com/api/retail/prices"


@dataclass(frozen=True)
class AzureOptions(_vm.VmOptions):
    subscription_id: str = option("", "Azure subscription id (default: the environment "
                                  "variable AZURE_SUBSCRIPTION_ID).")
    location: str = option("eastus", "Azure region (location), like eastus or westeurope.")
    vm_size: str = option("Standard_D2s_v5", "VM size.")
    image: str = option(UBUNTU, "Image as publisher:offer:sku:version (default: Ubuntu 24.04).")
    address_prefix: str = option("10.77.0.0/24", "The cluster's virtual network and subnet.")
    endpoint_url: str = option(ARM, "Azure Resource Manager's endpoint (another for a "
                               "sovereign cloud or Azure Stack Hub).")
    ssh_user: str = option("azureuser", "User to log in as on the VMs.")
    self_delete: bool = option(True, "An expiring VM deletes itself (a managed identity with "
                               "rights on that VM only). false: it only powers off, and is "
                               "billed for its compute until `cloudlab gc` deletes it.")


@dataclass
class Created:
    """What :meth:`Azure.create` made, for :meth:`Azure.delete` to remove: its group holds
    the rest."""

    cluster: str
    group: str | None = None
    subnet_id: str | None = None
    group_id: str | None = None  # the network security group's resource id
    instances: list[str] = field(default_factory=list)
    count: int = 0  # VMs named so far (names are never reused within a cluster)
    public_key: str = ""  # the cluster's SSH key, for every VM it adds


def subscription_of(options: AzureOptions) -> str:
    """The profile's subscription, else AZURE_SUBSCRIPTION_ID's ("": neither is set)."""
    return options.subscription_id or os.environ.get("AZURE_SUBSCRIPTION_ID", "")


def group_name(cluster: str) -> str:
    return f"cloudlab-{cluster}"


class Azure:
    """A subscription's Azure Resource Manager, with cloudlab's resources in it."""

    #: Extra arguments for the SDK's clients (tests: a transport replaying Azure's answers,
    #: and a credential; both also here for any pipeline option a site needs).
    connection: ClassVar[dict[str, Any]] = {}

    def __init__(self, options: AzureOptions):
        try:
            from azure.mgmt.authorization import AuthorizationManagementClient
            from azure.mgmt.compute import ComputeManagementClient
            from azure.mgmt.network import NetworkManagementClient
            try:
                from azure.mgmt.resource.resources import ResourceManagementClient
            except ImportError:  # (azure-mgmt-resource before 25)
                from azure.mgmt.resource import (  # type: ignore[attr-defined, no-redef]
                    ResourceManagementClient,
                )
        except ImportError:
            raise ConfigError("The azure backend needs Azure's SDK: pip install "
                              "'cloudlab[azure]'.") from None
        self.options = options
        self.subscription = subscription_of(options)
        if not self.subscription:
            raise ConfigError("No Azure subscription: set subscription_id in the profile's "
                              "[azure] table, or AZURE_SUBSCRIPTION_ID (`az account show` "
                              "prints its id).")
        connection = dict(self.connection)
        credential = connection.pop("credential", None)
        if credential is None:
            from azure.identity import DefaultAzureCredential

            credential = DefaultAzureCredential()
        self.credential = credential
        arguments = dict(credential=credential, subscription_id=self.subscription,
                         base_url=options.endpoint_url or ARM, **connection)
        self.resources = ResourceManagementClient(**arguments)
        self.network = NetworkManagementClient(**arguments)
        self.compute = ComputeManagementClient(**arguments)
        self.authorization = AuthorizationManagementClient(**arguments)
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ create
    def create(self, cluster: str, count: int, public_key: str, user_data: str,
               client_cidr: str) -> Created:
        """Resource group, network and ``count`` VMs; on any failure, none of them."""
        o = self.options
        created = Created(cluster, public_key=public_key.strip())
        tags = _vm.tags(cluster, o.max_hours)
        try:
            created.group = group_name(cluster)
            self.resources.resource_groups.create_or_update(
                created.group, {"location": o.location, "tags": tags})
            # Bodies are Resource Manager's JSON, as its REST reference documents them (not
            # the SDK's types, whose network TypedDicts require read-only keys: the ignores).
            nsg = self.network.network_security_groups.begin_create_or_update(  # type: ignore[call-overload]
                created.group, f"{cluster}-nsg", {
                    "location": o.location, "tags": tags, "properties": {"securityRules": [{
                        "name": "ssh-from-cloudlab-client", "properties": {
                            "priority": 100, "direction": "Inbound", "access": "Allow",
                            "protocol": "Tcp", "sourceAddressPrefix": client_cidr,
                            "sourcePortRange": "*", "destinationAddressPrefix": "*",
                            "destinationPortRange": "22", "description": "cloudlab client"}}]},
                }).result()
            created.group_id = nsg.id
            vnet = self.network.virtual_networks.begin_create_or_update(  # type: ignore[call-overload]
                created.group, f"{cluster}-vnet", {
                    "location": o.location, "tags": tags, "properties": {
                        "addressSpace": {"addressPrefixes": [o.address_prefix]},
                        "subnets": [{"name": "engines", "properties": {
                            "addressPrefix": o.address_prefix,
                            "networkSecurityGroup": {"id": nsg.id}}}]},
                }).result()
            created.subnet_id = vnet.subnets[0].id
            self.add_instances(cluster, count, user_data, created)
        except BaseException:
            self.delete(created)
            raise
        return created

    def add_instances(self, cluster: str, count: int, user_data: str,
                      created: Created) -> list[str]:
        """``count`` more VMs, created side by side; their names."""
        with self._lock:
            names = [f"{cluster}-{created.count + i + 1}" for i in range(count)]
            created.count += count
        created.instances.extend(names)
        failures: list[BaseException] = []

        def one(name: str) -> None:
            try:
                self._add_vm(created, name, user_data)
            except BaseException as e:  # noqa: BLE001 (re-raised below, as one sentence)
                failures.append(e)

        threads = [threading.Thread(target=one, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise self.explain(failures[0], count)
        return names

    def _add_vm(self, created: Created, name: str, user_data: str) -> None:
        o = self.options
        tags = _vm.tags(created.cluster, o.max_hours)
        ip_configuration: dict[str, Any] = {"subnet": {"id": created.subnet_id}}
        if not o.use_private_ip:
            address = self.network.public_ip_addresses.begin_create_or_update(  # type: ignore[call-overload]
                created.group, f"{name}-ip", {
                    "location": o.location, "tags": tags, "sku": {"name": "Standard"},
                    "properties": {"publicIPAllocationMethod": "Static"}}).result()
            ip_configuration["publicIPAddress"] = {"id": address.id,
                                                   "properties": {"deleteOption": "Delete"}}
        nic = self.network.network_interfaces.begin_create_or_update(  # type: ignore[call-overload]
            created.group, f"{name}-nic", {"location": o.location, "tags": tags, "properties": {
                "ipConfigurations": [{"name": "ip", "properties": ip_configuration}]}}).result()
        publisher, offer, sku, version = _image(o.image)
        properties: dict[str, Any] = {
            "hardwareProfile": {"vmSize": o.vm_size},
            "storageProfile": {
                "imageReference": {"publisher": publisher, "offer": offer, "sku": sku,
                                   "version": version},
                "osDisk": {"createOption": "FromImage", "deleteOption": "Delete",
                           "managedDisk": {"storageAccountType": "StandardSSD_LRS"}}},
            "osProfile": {
                "computerName": name, "adminUsername": o.ssh_user,
                "customData": base64.b64encode(user_data.encode()).decode(),
                "linuxConfiguration": {
                    "disablePasswordAuthentication": True,
                    "ssh": {"publicKeys": [{"path": f"/home/{o.ssh_user}/.ssh/authorized_keys",
                                            "keyData": created.public_key}]}}},
            "networkProfile": {"networkInterfaces": [
                {"id": nic.id, "properties": {"primary": True, "deleteOption": "Delete"}}]},
        }
        if o.spot:
            properties.update(priority="Spot", evictionPolicy="Delete",
                              billingProfile={"maxPrice": o.max_price or -1})
        vm: dict[str, Any] = {"location": o.location, "tags": {**tags, "Name": name},
                              "properties": properties}
        if o.self_delete:
            vm["identity"] = {"type": "SystemAssigned"}
        made = self.compute.virtual_machines.begin_create_or_update(  # type: ignore[call-overload]
            created.group, name, vm).result()
        if o.self_delete:
            self._may_delete_itself(made)

    def _may_delete_itself(self, vm) -> None:
        """Let the VM's own identity manage that VM, and nothing else."""
        role = (f"/subscriptions/{self.subscription}/providers/Microsoft.Authorization/"
                f"roleDefinitions/{VM_CONTRIBUTOR}")
        deadline = time.monotonic() + 60
        while True:
            try:
                self.authorization.role_assignments.create(vm.id, str(uuid.uuid4()), {
                    "properties": {"roleDefinitionId": role,
                                   "principalId": vm.identity.principal_id,
                                   "principalType": "ServicePrincipal"}})
                return
            except Exception as e:
                # A new identity takes a moment to be known to Azure's directory.
                if _code(e) != "PrincipalNotFound" or time.monotonic() > deadline:
                    raise
                time.sleep(3)

    # ------------------------------------------------------------------ look
    def describe(self, names: list[str] | None = None, created: Created | None = None,
                 group: str | None = None) -> list[Vm]:
        """The VMs ``names`` of a cluster's group (a VM that is gone: state terminated)."""
        from azure.core.exceptions import ResourceNotFoundError

        group = group or (created.group if created else None)
        if names == [] or group is None:
            return []
        try:
            # (The SDK's models type every field Optional, those Azure always fills in too.)
            nics = {n.id.lower(): n  # type: ignore[union-attr]
                    for n in self.network.network_interfaces.list(group)}
            addresses = {a.id.lower(): a.ip_address  # type: ignore[union-attr]
                         for a in self.network.public_ip_addresses.list(group)}
            names = names or [vm.name  # type: ignore[misc]
                              for vm in self.compute.virtual_machines.list(group)]
        except ResourceNotFoundError:  # the whole group is gone
            return [Vm(n, "terminated", None, None, 0.0, "its resource group is deleted")
                    for n in names or []]
        found = []
        for name in names:
            try:
                vm = self.compute.virtual_machines.get(group, name, expand="instanceView")
            except ResourceNotFoundError:
                found.append(Vm(name, "terminated", None, None, 0.0, "deleted"))
                continue
            private = public = None
            for reference in vm.network_profile.network_interfaces:
                nic = nics.get(reference.id.lower())
                for configuration in (nic.ip_configurations if nic else []):
                    private = private or configuration.private_ip_address
                    if configuration.public_ip_address:
                        public = public or addresses.get(configuration.public_ip_address.id.lower())
            state, reason = _state(vm)
            launched = vm.time_created.timestamp() if vm.time_created else time.time()
            found.append(Vm(name, state, private, public, launched, reason, dict(vm.tags or {})))
        return found

    def cloudlab_groups(self) -> list:
        """Every resource group of a cloudlab cluster in the subscription."""
        return list(self.resources.resource_groups.list(
            filter=f"tagName eq '{_vm.TAG_CLUSTER}'"))

    def vcpus(self) -> int:
        for size in self.compute.virtual_machine_sizes.list(self.options.location):
            if size.name.lower() == self.options.vm_size.lower():  # type: ignore[union-attr]
                return size.number_of_cores  # type: ignore[return-value]
        raise StartError(f"VM size {self.options.vm_size} is not offered in "
                         f"{self.options.location}: set vm_size in the profile's [azure] "
                         f"table to one that is (`az vm list-sizes -l {self.options.location}`).")

    def price(self) -> float | None:
        """The VM's pay-as-you-go (or spot) Linux price, $/h, from Azure's public price list."""
        o = self.options
        query = urllib.parse.urlencode({"$filter": (
            f"serviceName eq 'Virtual Machines' and armRegionName eq '{o.location}' and "
            f"armSkuName eq '{o.vm_size}' and priceType eq 'Consumption'")})
        try:
            with urllib.request.urlopen(f"{PRICES}?{query}", timeout=5) as reply:
                return linux_price(json.load(reply)["Items"], o.spot)
        except (OSError, ValueError, KeyError):
            return None

    # ------------------------------------------------------------------ delete
    def terminate(self, names: list[str], created: Created, wait: float = 600.0) -> None:
        """Delete VMs ``names`` (their disks, interfaces and addresses go with them)."""
        assert created.group is not None  # (made first: see create)
        pollers = [self.compute.virtual_machines.begin_delete(created.group, n) for n in names]
        _wait_all(pollers, wait, f"VMs {', '.join(names)}")

    def delete(self, created: Created, wait: float = 900.0) -> None:
        """Delete the cluster's resource group, and with it everything in it."""
        if created.group is None:
            return
        from azure.core.exceptions import ResourceNotFoundError

        try:
            poller = self.resources.resource_groups.begin_delete(created.group)
        except ResourceNotFoundError:
            poller = None
        if poller is not None:
            _wait_all([poller], wait, f"resource group {created.group}")
        created.group = None
        created.instances = []

    def explain(self, error: BaseException, count: int) -> BaseException:
        """Azure's refusal to create VMs, as one sentence with the fix."""
        if isinstance(error, (StartError, ConfigError, KeyboardInterrupt, SystemExit)):
            return error
        code, message = _code(error), getattr(error, "message", None) or str(error)
        o = self.options
        what = f"{count} x {o.vm_size} in {o.location}"
        if code in ("SkuNotAvailable", "AllocationFailed", "ZonalAllocationFailed",
                    "OverconstrainedAllocationRequest"):
            return StartError(f"Azure has no capacity for {what} right now ({code}): try "
                              f"another vm_size or another location.")
        if code in ("QuotaExceeded", "OperationNotAllowed") and "quota" in message.lower():
            return StartError(f"Your vCPU quota in {o.location} is too small for {what}: ask "
                              f"for more (Azure portal, Quotas), or start fewer engines.")
        if code == "AuthorizationFailed" and "roleAssignments" in message:
            return StartError("Your Azure account may not let a VM delete itself "
                              "(Microsoft.Authorization/roleAssignments/write): ask for the "
                              "'Role Based Access Control Administrator' role on the "
                              "subscription, or set self_delete = false in the profile's "
                              "[azure] table (expired VMs then wait for `cloudlab gc`).")
        if code == "AuthorizationFailed":
            return StartError("Your Azure account may not create VMs here "
                              "(AuthorizationFailed): ask for the Contributor role on the "
                              "subscription, or use another profile.")
        if code in ("PlatformImageNotFound", "ImageNotFound", "InvalidParameter") and \
                "image" in message.lower():
            return StartError(f"Image {o.image} does not exist in {o.location}: set image in "
                              f"the profile's [azure] table (`az vm image list`).")
        if code in ("SpotPriceBelowCurrent", "MaxPriceTooLow") or \
                ("max price" in message.lower() and o.spot):
            return StartError(f"The spot price of {o.vm_size} in {o.location} is above "
                              f"max_price ({o.max_price:g} $/h): raise max_price, or set it "
                              f"to 0.")
        return StartError(f"Azure refused to create {what}: {code}: {message}")


def _image(image: str) -> tuple[str, str, str, str]:
    parts = image.split(":")
    if len(parts) != 4 or not all(parts):
        raise ConfigError(f"Image {image!r} is not publisher:offer:sku:version: fix image in "
                          f"the profile's [azure] table, like {UBUNTU!r}.")
    return parts[0], parts[1], parts[2], parts[3]


def _code(error: BaseException) -> str:
    return getattr(getattr(error, "error", None), "code", None) or type(error).__name__


def _state(vm) -> tuple[str, str]:
    """The VM's state in EC2's words (what :class:`._vm.VmBackend` reads), and why."""
    if (vm.provisioning_state or "").lower() == "deleting":
        return "shutting-down", "being deleted"
    statuses = vm.instance_view.statuses if vm.instance_view else []
    power = next((s.code.split("/", 1)[1] for s in statuses or []
                  if s.code and s.code.startswith("PowerState/")), "starting")
    return {"running": "running", "starting": "pending", "stopping": "stopping",
            "stopped": "stopped", "deallocating": "stopping",
            "deallocated": "stopped"}.get(power, "pending"), f"PowerState/{power}"


def linux_price(items: list[dict], spot: bool) -> float | None:
    """The Linux $/h among a VM size's price list entries (spot or not; not low priority)."""
    for item in items:
        name = f"{item.get('meterName', '')} {item.get('skuName', '')}"
        if item.get("productName", "").endswith("Windows") or "Low Priority" in name:
            continue
        if ("Spot" in name) == spot and item.get("unitOfMeasure") == "1 Hour":
            return float(item["retailPrice"])
    return None


def _wait_all(pollers: list, wait: float, what: str) -> None:
    deadline = time.monotonic() + wait
    for poller in pollers:
        poller.wait(max(1.0, deadline - time.monotonic()))
        if not poller.done():
            raise StartError(f"Azure had not deleted {what} after {wait:g} s; check the Azure "
                             f"portal, then run cloudlab gc.")
        poller.result()


def collect_garbage(azure: Azure, live_clusters: set[str], dry_run: bool = False) -> list[str]:
    """Delete expired and orphaned cloudlab resource groups (:func:`_vm.why_garbage`), and
    with each everything in it. One line per group, saying what and why."""
    said, doomed = [], []
    for group in azure.cloudlab_groups():
        why = _vm.why_garbage(dict(group.tags or {}), live_clusters)
        if why:
            said.append(f"resource group {group.name} (cluster "
                        f"{group.tags[_vm.TAG_CLUSTER]}): {why}")
            doomed.append(group.name)
    if not dry_run:
        pollers = [azure.resources.resource_groups.begin_delete(g) for g in doomed]
        _wait_all(pollers, 900.0, f"resource groups {', '.join(doomed)}")
    return said


class AzureBackend(_vm.VmBackend):
    """Engines on Azure VMs (the cloud-independent part is :class:`._vm.VmBackend`)."""

    name = "azure"
    Options = AzureOptions
    #: The VM's name, from its instance metadata service.
    instance_id_command = ('curl -sf -H Metadata:true "http://169.254.169.254/metadata/'
                           'instance/compute/name?api-version=2021-02-01&format=text"')

    def make_cloud(self) -> Azure:
        return Azure(self.options)

    def on_expiry(self) -> str:
        """The VM deletes itself through its managed identity (its disk, interface and
        address go with it); the resource group, which costs nothing, waits for gc."""
        if not self.options.self_delete:
            return ""
        arm = (self.options.endpoint_url or ARM).rstrip("/")
        imds = "http://169.254.169.254/metadata"
        resource = urllib.parse.quote(arm + "/", safe="")
        return (
            f'token=$(curl -sf -H Metadata:true "{imds}/identity/oauth2/token?'
            f'api-version=2018-02-01&resource={resource}" '
            "| sed -n 's/.*\"access_token\": *\"\\([^\"]*\\)\".*/\\1/p')\n"
            f'vm=$(curl -sf -H Metadata:true "{imds}/instance/compute/resourceId?'
            'api-version=2021-02-01&format=text")\n'
            f'curl -sf -X DELETE -H "Authorization: Bearer $token" '
            f'"{arm}$vm?api-version={COMPUTE_API}" && echo "cloudlab: deleting $vm"')

    def vcpus(self) -> int:
        return self.cloud.vcpus()

    @classmethod
    def doctor(cls, options: AzureOptions, engines: int) -> list:
        from .azure_doctor import diagnose

        return diagnose(options, engines)

    @classmethod
    def garbage_place(cls, options: AzureOptions) -> tuple[tuple, str]:
        subscription = subscription_of(options)
        return ((subscription, options.endpoint_url),
                f"Azure subscription {subscription or '(none set)'}")

    @classmethod
    def collect_garbage(cls, options: AzureOptions, live: set[str], dry_run: bool) -> list[str]:
        return collect_garbage(Azure(options), live, dry_run=dry_run)

    def price_per_hour(self) -> float | None:
        if self.options.price_per_hour:
            return self.options.price_per_hour
        return self.cloud.price() if self.cloud is not None else None

    def describe(self, names: list[str]) -> list[Vm]:
        return self.cloud.describe(names, self.created)

    def lost(self, vm: Vm) -> str:
        if self.options.spot and vm.reason == "deleted":
            return f"lost its spot VM {vm.id}: Azure evicted it"
        return f"lost its VM {vm.id}, which was {vm.state} ({vm.reason or 'no reason given'})"

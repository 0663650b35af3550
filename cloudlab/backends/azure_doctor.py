"""`cloudlab doctor --profile azure`: will a start work? Asked of Azure in seconds, before
anything is created, one line per check, and one fix per failure.

Credentials, subscription (Microsoft.Compute and Microsoft.Network registered in it, as a
fresh subscription may not have them), the VM size in the location (offered, and not
restricted for this subscription), the image, the vCPU quotas (the size's family, and the
region's total), the size of the bootstrap, this machine's address for the SSH rule, and
the local ssh tools. Azure has no dry run: the right to create VMs, and to let them delete
themselves, shows at the first start, whose refusal says the fix.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import CloudlabError
from ._doctor import Check, bootstrap_size, checker, local_tools, ssh_rule
from .azure import ARM, Azure, AzureBackend, AzureOptions, _code, _image


def diagnose(options: AzureOptions, engines: int) -> list[Check]:
    """Every check, in order; a failure does not stop the later ones where they can run."""
    checks: list[Check] = []
    check = checker(checks, _code)
    api: dict[str, Azure] = {}
    if not check("credentials", lambda: _credentials(options, api)):
        return checks  # nothing else can be asked
    check("subscription", lambda: _subscription(api["azure"]))
    size: dict[str, Any] = {}
    check("VM size", lambda: _size(api["azure"], size))
    check("image", lambda: _image_exists(api["azure"]))
    check("vCPU quota", lambda: _quota(api["azure"], size, engines))
    check("bootstrap size", lambda: bootstrap_size(options, AzureBackend.instance_id_command))
    check("SSH rule", lambda: ssh_rule(options))
    check("local tools", local_tools)
    return checks


def _credentials(options: AzureOptions, api: dict):
    from azure.core.exceptions import ClientAuthenticationError

    try:
        azure = api["azure"] = Azure(options)
    except CloudlabError as e:
        return False, str(e)
    scope = f"{(options.endpoint_url or ARM).rstrip('/')}/.default"
    try:
        azure.credential.get_token(scope)
    except ClientAuthenticationError:
        return False, ("no Azure credentials found: run `az login`, or set AZURE_CLIENT_ID, "
                       "AZURE_TENANT_ID and AZURE_CLIENT_SECRET.")
    return True, f"a token for Resource Manager (subscription {azure.subscription})"


def _subscription(azure: Azure):
    unregistered = [n for n in ("Microsoft.Compute", "Microsoft.Network")
                    if azure.resources.providers.get(n).registration_state != "Registered"]
    if unregistered:
        return False, (f"{' and '.join(unregistered)} not registered in subscription "
                       f"{azure.subscription}: run `az provider register --namespace "
                       f"{unregistered[0]}`" + (" (and the other)." if len(unregistered) > 1
                                                else "."))
    return True, f"{azure.subscription}: Microsoft.Compute and Microsoft.Network registered"


def _size(azure: Azure, found: dict):
    o = azure.options
    for sku in azure.compute.resource_skus.list(filter=f"location eq '{o.location}'"):
        # (The SDK's models type every field Optional, those Azure always fills in too.)
        if (sku.resource_type != "virtualMachines"
                or sku.name.lower() != o.vm_size.lower()):  # type: ignore[union-attr]
            continue
        capabilities = {c.name: c.value for c in sku.capabilities or []}
        found.update(family=sku.family,
                     vcpus=int(capabilities.get("vCPUs", 0)))  # type: ignore[arg-type]
        restricted = [r for r in sku.restrictions or []
                      if r.type == "Location" and r.reason_code == "NotAvailableForSubscription"]
        if restricted:
            return False, (f"{o.vm_size} is not available to your subscription in "
                           f"{o.location}: choose another vm_size or location, or ask Azure "
                           f"support to lift the restriction.")
        return True, f"{o.vm_size} in {o.location}: {found['vcpus']} vCPUs ({sku.family})"
    return False, (f"{o.vm_size} is not offered in {o.location}: set vm_size in the profile's "
                   f"[azure] table (`az vm list-sizes -l {o.location}`).")


def _image_exists(azure: Azure):
    from azure.core.exceptions import ResourceNotFoundError

    o = azure.options
    publisher, offer, sku, version = _image(o.image)
    try:
        versions = [v.name for v in azure.compute.virtual_machine_images.list(
            o.location, publisher, offer, sku)]
    except ResourceNotFoundError:
        versions = []
    if not versions or (version != "latest" and version not in versions):
        return False, (f"image {o.image} does not exist in {o.location}: set image in the "
                       f"profile's [azure] table (`az vm image list --all --offer {offer}`).")
    return True, f"{o.image} ({len(versions)} versions, newest {max(versions)})"


def _quota(azure: Azure, size: dict, engines: int):
    if not size.get("vcpus"):
        return None, "not checked: the VM size is not known"
    o = azure.options
    per_vm = o.engines_per_instance or size["vcpus"]
    needed = math.ceil(engines / per_vm) * size["vcpus"]
    usages = {u.name.value: u for u in azure.compute.usage.list(o.location)}
    wanted = ["lowPriorityCores"] if o.spot else [size["family"], "cores"]
    for name in wanted:
        usage = usages.get(name)
        if usage is None:
            continue
        free = usage.limit - usage.current_value
        if needed > free:
            return False, (f"{engines} engines need {needed} vCPUs of {o.vm_size}, over the "
                           f"{free} left of your {usage.name.localized_value} quota in "
                           f"{o.location}: ask for more (Azure portal, Quotas), or start "
                           f"fewer engines.")
    left = min((usages[n].limit - usages[n].current_value for n in wanted if n in usages),
               default=None)
    if left is None:
        return None, "not checked: Azure reports no quota for this size here"
    return True, f"{needed} vCPUs needed, {left} left ({', '.join(wanted)})"

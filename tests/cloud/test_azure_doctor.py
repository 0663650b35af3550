"""`cloudlab doctor --profile` for Azure, against the replayed Resource Manager
(tests/fake_arm.py): every check passes for a usable profile, and each failure Azure can
give (no credentials, an unregistered provider, a size not offered or restricted, a
missing image, a quota too small) is one line with its fix."""

import pytest
from azure.core.exceptions import ClientAuthenticationError

from cloudlab.backends import azure_doctor
from cloudlab.backends.azure import Azure, AzureOptions
from cloudlab.cli import main

SUBSCRIPTION = "11111111-2222-3333-4444-555555555555"


def _options(**more) -> AzureOptions:
    return AzureOptions(subscription_id=SUBSCRIPTION, client_cidr="203.0.113.7/32", **more)


def _check(name: str, **more):
    return next(c for c in azure_doctor.diagnose(_options(**more), engines=4) if c.name == name)


def test_a_usable_profile_passes_every_check(fake_arm, write_profile, capsys):
    profile = write_profile("azure-doctor", {"backend": "azure", "subscription_id": SUBSCRIPTION,
                                             "client_cidr": "203.0.113.7/32"}, engines=8)
    assert main(["doctor", "--profile", profile]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:-1] == [
        f"ok   credentials: a token for Resource Manager (subscription {SUBSCRIPTION})",
        f"ok   subscription: {SUBSCRIPTION}: Microsoft.Compute and Microsoft.Network registered",
        "ok   VM size: Standard_D2s_v5 in eastus: 2 vCPUs (standardDSv5Family)",
        "ok   image: Canonical:ubuntu-24_04-lts:server:latest (2 versions, newest "
        "24.04.202411030)",
        "ok   vCPU quota: 8 vCPUs needed, 10 left (standardDSv5Family, cores)",
        lines[5],
        "ok   SSH rule: SSH (port 22) open to 203.0.113.7/32 only",
        "ok   local tools: ssh and ssh-keygen found"]
    assert lines[5].startswith("ok   bootstrap size: ") and lines[5].endswith(" of 16,384")
    assert lines[-1].startswith("8 of 8 checks passed in ")
    assert fake_arm.groups == {} and fake_arm.resources == {}  # it created nothing


class _NoCredential:
    def get_token(self, *scopes, **kwargs):
        raise ClientAuthenticationError("DefaultAzureCredential failed to retrieve a token "
                                        "from the included credentials.")


def test_missing_credentials_say_how_to_get_them(fake_arm, monkeypatch):
    monkeypatch.setattr(Azure, "connection", {**Azure.connection, "credential": _NoCredential()})
    checks = azure_doctor.diagnose(_options(), engines=2)
    assert [str(c) for c in checks] == [
        "FAIL credentials: no Azure credentials found: run `az login`, or set AZURE_CLIENT_ID, "
        "AZURE_TENANT_ID and AZURE_CLIENT_SECRET."]


def test_no_subscription_says_where_to_set_it(fake_arm, monkeypatch):
    monkeypatch.delenv("AZURE_SUBSCRIPTION_ID", raising=False)
    [check] = azure_doctor.diagnose(AzureOptions(), engines=2)
    assert str(check).startswith("FAIL credentials: No Azure subscription: set subscription_id")


@pytest.mark.parametrize("setup, name, more, says", [
    (lambda arm: arm.unregistered.add("microsoft.compute"), "subscription", {},
     f"Microsoft.Compute not registered in subscription {SUBSCRIPTION}: run `az provider "
     f"register --namespace Microsoft.Compute`."),
    (lambda arm: None, "VM size", {"vm_size": "Standard_Huge"},
     "Standard_Huge is not offered in eastus: set vm_size in the profile's [azure] table "
     "(`az vm list-sizes -l eastus`)."),
    (lambda arm: arm.restricted.add("Standard_D2s_v5"), "VM size", {},
     "Standard_D2s_v5 is not available to your subscription in eastus: choose another "
     "vm_size or location, or ask Azure support to lift the restriction."),
    (lambda arm: None, "image", {"image": "Canonical:nope:server:latest"},
     "image Canonical:nope:server:latest does not exist in eastus: set image in the "
     "profile's [azure] table (`az vm image list --all --offer nope`)."),
    (lambda arm: arm.usages.update(standardDSv5Family=("Standard DSv5 Family vCPUs", 8, 10)),
     "vCPU quota", {},
     "4 engines need 4 vCPUs of Standard_D2s_v5, over the 2 left of your Standard DSv5 "
     "Family vCPUs quota in eastus: ask for more (Azure portal, Quotas), or start fewer "
     "engines."),
    (lambda arm: None, "vCPU quota", {"spot": True},
     "4 engines need 4 vCPUs of Standard_D2s_v5, over the 3 left of your Total Regional "
     "Low-priority vCPUs quota in eastus: ask for more (Azure portal, Quotas), or start "
     "fewer engines."),
])
def test_each_failure_is_one_line_with_its_fix(fake_arm, setup, name, more, says):
    setup(fake_arm)
    check = _check(name, **more)
    assert (check.ok, check.detail) == (False, says)

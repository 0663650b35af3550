"""notebooks/06-cloud.ipynb runs top to bottom against EC2 played by moto_server, with the
instances booting as namespace hosts (the `ec2_cloud` fixture): its PROFILE parameter is a
profile pointing at them. It runs twice: through nbclient, and as an attendee runs it, in a
real JupyterLab in chromium (Run All Cells). It must leave no instance, security group or
key pair behind."""

import nbformat
import pytest
from nbclient import NotebookClient

from conftest import ROOT, wait_until_gone
from jupyterlab_support import (
    check_what_an_attendee_sees,
    chromium_page,
    lab_for_a_test,
    run_in_lab,
)

NOTEBOOK = ROOT / "notebooks" / "06-cloud.ipynb"


def _outputs(cell) -> str:
    return "".join(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", ""))
                   for o in cell.get("outputs", []))


def _with_profile(profile: str):
    """The notebook with its PROFILE parameter set, as an attendee sets it."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    [parameters] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = f'PROFILE = "{profile}"  # (injected by the test)'
    return nb


def _check(said: str, api, vms, before: set) -> None:
    """What the notebook printed, and what is left of the cluster in the cloud."""
    # The preflight passed what moto can answer; the four engines ran on four new instances.
    assert "ok   credentials: arn:aws:sts::123456789012:" in said
    assert "FAIL" not in said
    assert len(set(vms.booted) - before) == 4
    assert [f"engine {i} on VM " in said for i in range(4)] == [True] * 4
    assert "pi is about 3.14" in said
    assert "4 VMs running\n$0.40 per hour, $" in said
    assert "0 resources to delete in us-east-1." in said
    assert wait_until_gone(timeout=10) == []
    assert [vm for vm in api.cloudlab_instances() if vm.state in ("pending", "running")] == []
    assert api.cloudlab_groups() == [] and api.cloudlab_key_pairs() == []


def test_the_cloud_notebook_runs_against_moto(ec2_cloud, write_profile, tmp_path):
    api, vms, options = ec2_cloud
    nb = _with_profile(write_profile("moto-aws", options, engines=4))
    before = set(vms.booted)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    nbformat.write(nb, tmp_path / NOTEBOOK.name)  # the executed copy, for inspection
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    _check("\n".join(_outputs(c) for c in nb.cells if c.cell_type == "code"), api, vms, before)


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_the_cloud_notebook_runs_in_jupyterlab(ec2_cloud, write_profile, tmp_path):
    api, vms, options = ec2_cloud
    nb = _with_profile(write_profile("moto-aws", options, engines=4))
    before = set(vms.booted)
    # Started now, so that its kernels have moto's credentials (set by the fixture).
    with lab_for_a_test(tmp_path / "lab") as lab, \
            chromium_page(tmp_path / "chromium") as page:
        nbformat.write(nb, lab.root / NOTEBOOK.name)
        seen = run_in_lab(lab, page, NOTEBOOK.name, tmp_path / "failure.png")
    check_what_an_attendee_sees(NOTEBOOK.name, nb, seen)
    _check("\n".join(c["output"] for c in seen if c["code"]), api, vms, before)

"""notebooks/06-cloud.ipynb runs top to bottom against EC2 played by moto_server, with the
instances booting as namespace hosts (the `ec2_cloud` fixture): its PROFILE parameter is a
profile pointing at them. It must leave no instance, security group or key pair behind."""

import nbformat
from nbclient import NotebookClient

from conftest import ROOT, wait_until_gone

NOTEBOOK = ROOT / "notebooks" / "06-cloud.ipynb"


def _outputs(cell) -> str:
    return "".join(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", ""))
                   for o in cell.get("outputs", []))


def test_the_cloud_notebook_runs_against_moto(ec2_cloud, write_profile, tmp_path):
    api, vms, options = ec2_cloud
    profile = write_profile("moto-aws", options, engines=4)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    [parameters] = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    parameters.source = f'PROFILE = "{profile}"  # (injected by the test)'
    before = set(vms.booted)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    nbformat.write(nb, tmp_path / NOTEBOOK.name)  # the executed copy, for inspection
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.output_type == "error"]
    assert errors == []
    text = {i: _outputs(c) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    said = "\n".join(text.values())
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

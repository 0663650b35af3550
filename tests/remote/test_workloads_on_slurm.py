"""The workloads, unchanged, on one cluster of Slurm jobs on nodes that share nothing with
the client, run as `cloudlab run` runs them: inputs reach the nodes as values (pushed),
never as the client's paths. The queue form's Redis listens where the nodes reach this
machine (the controller's address), with a password."""

import math

import cloudlab
from conftest import wait_until_gone
from workload_runs import run_workload as run


def test_the_workloads_run_unchanged_on_the_nodes(test_slurm, tmp_path):
    with cloudlab.Cluster(2, engine="dask", backend="slurm",
                          client_address=test_slurm.network.client_address,
                          log_dir=str(tmp_path / "slurm-logs"),
                          env_dir=str(test_slurm.env_dir)) as c:
        figures = run(c, "pi", "--samples", "2e8")
        assert abs(figures["estimate"] - math.pi) < 5 * figures["stderr"]
        for mode in ("cluster", "queue"):
            figures = run(c, "classify", "--limit", "3000", "--mode", mode)
            assert figures["documents"] == figures["rows"] == 3000, mode
            assert figures["accuracy"] > 0.75 and figures["workers"] == 2, mode
        figures = run(c, "pct", "--size", "small")
        assert figures["max_insert_error_pct"] <= 1.0
        assert figures["rmse"] <= 0.040 and figures["rmse"] < figures["rmse_fbp"]
    assert wait_until_gone(c.name, 10) == []

"""Workloads: real computations to run on a cluster, each usable from Python and `cloudlab run`.

A workload module offers ``add_arguments(parser)``, ``run(cluster, args) -> dict`` and
``summary(figures) -> str`` for the CLI, beside its Python API (``pi.estimate(cluster, samples, seed=...)``).
"""

WORKLOADS = {
    "pi": "cloudlab.workloads.pi",
    "pct": "cloudlab.workloads.pct",
    "classify": "cloudlab.workloads.classify",
}

"""Run a workload on a cluster the test made, exactly as `cloudlab run WORKLOAD ARGS` runs it
on the cluster it makes (the same parser, ``prepare`` and ``run``): several workloads on one
cluster cost one start."""

from cloudlab.cli import build_parser
from cloudlab.plugins import workload_module


def run_workload(cluster, *argv: str) -> dict:
    args = build_parser().parse_args(["run", *argv])
    module = workload_module(args.workload)
    if hasattr(module, "prepare"):
        args.inputs = module.prepare(args)
    return module.run(cluster, args)

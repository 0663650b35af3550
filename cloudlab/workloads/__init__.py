"""Workloads: real computations to run on a cluster, each usable from Python and `cloudlab run`.

A workload module offers ``add_arguments(parser)``, ``run(cluster, args) -> dict`` and
``summary(figures) -> str`` for the CLI, beside its Python API (``pi.estimate(cluster,
samples, seed=...)``). It may also offer ``prepare(args)``, which reads the inputs before
the cluster starts (into ``args.inputs``): a ValueError or OSError there is bad input, said
in one line with nothing started; and ``cluster_options(args)``, the keywords of the
cluster it needs (``n``, ``mpi=True``...).

Workloads are found by the ``cloudlab.workloads`` entry point (a name and a module), so
another package can add one to ``cloudlab run``.
"""

"""The ``cloudlab`` command: start, list, stop clusters and run workloads from a shell.

    cloudlab start N [--engine E] [--profile P]   foreground; Ctrl-C stops cleanly
    cloudlab list                                  clusters running on this machine
    cloudlab stop NAME | --all                     stop clusters owned by any process
    cloudlab run WORKLOAD [options] [--json]       e.g. cloudlab run pi --engines 4 --samples 1e9
    cloudlab profiles                              profiles and where they come from
    cloudlab doctor --profile P                    will this cloud profile start? (creates nothing)
    cloudlab gc [--profile P] [--dry-run]          delete expired or orphaned cloud resources
    cloudlab bench [--quick] [--only M,...]        cloudlab vs raw ipyparallel and Dask, one run
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import TYPE_CHECKING

from .errors import CloudlabError
from .plugins import workload_module, workload_names

if TYPE_CHECKING:
    from .backends.base import Backend


def _cluster_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--engine", help="ipyparallel (default) or dask")
    parser.add_argument("--profile", help="profile name (default: local)")
    parser.add_argument("--backend", help="backend name (default: the profile's)")
    parser.add_argument("--gpus", help="all, or a count: one engine per GPU (default: none)")
    parser.add_argument("--mpi", action="store_true", default=None,
                        help="the engines are the ranks of one MPI job (local and ssh backends)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cloudlab", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        """A subcommand whose one-line help is also its description (`cloudlab NAME -h`)."""
        return sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")

    start = command("start", "start a cluster in the foreground (Ctrl-C stops it)")
    start.add_argument("n", nargs="?", help="number of engines (default: the profile's; "
                                            "local: one per core)")
    start.add_argument("--name", help="the cluster's name (default: like ipp-1a2b3c)")
    _cluster_arguments(start)

    command("list", "clusters running on this machine, whichever process owns them")

    stop = command("stop", "stop clusters, whichever process owns them")
    stop.add_argument("name", nargs="?", help="the cluster to stop (`cloudlab list` names them)")
    stop.add_argument("--all", action="store_true", help="stop every cluster")

    command("profiles", "available profiles, their description and file")

    doctor = command("doctor", "check that a cloud profile can start, in seconds, creating "
                               "nothing")
    doctor.add_argument("--profile", required=True, help="the cloud profile, e.g. aws-cpu")
    doctor.add_argument("--engines", type=int, help="engines to check the quota for "
                                                    "(default: the profile's)")

    gc = command("gc", "delete expired or orphaned cloud resources (VMs, security groups, "
                       "keys, Azure resource groups)")
    gc.add_argument("--profile", help="the cloud profile whose region or subscription to clean "
                                      "(default: every cloud profile)")
    gc.add_argument("--dry-run", action="store_true", help="say what would go, delete nothing")

    bench = command("bench", "measure cloudlab against raw ipyparallel and raw Dask")
    bench.add_argument("--quick", action="store_true",
                       help="small sizes, one repetition (under 2 minutes on 2 cores)")
    bench.add_argument("--reps", type=int, help="repetitions (default: 3, or 1 with --quick)")
    bench.add_argument("--only", help="comma-separated measures: start, start2, map, rtt, push, "
                                      "pi, stop (default: all)")
    bench.add_argument("--out", default="bench-results",
                       help="folder for bench.json and bench.png (default: bench-results)")

    run = command("run", "run a workload on a fresh cluster, print its figures")
    workloads = run.add_subparsers(dest="workload", required=True, metavar="WORKLOAD")
    for name in workload_names():
        mod = workload_module(name)
        summary = (mod.__doc__ or "").split("\n")[0]
        wp = workloads.add_parser(name, help=summary, description=summary)
        wp.add_argument("--engines", default=None, help="number of engines (default: the "
                                                        "profile's; local: one per core)")
        _cluster_arguments(wp)
        wp.add_argument("--json", action="store_true", help="print one JSON object")
        mod.add_arguments(wp)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return globals()[f"cmd_{args.command}"](args) or 0
    except CloudlabError as e:
        print(f"cloudlab: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def cmd_start(args) -> int:
    from .cluster import Cluster

    cluster = Cluster(args.n, engine=args.engine, profile=args.profile, backend=args.backend,
                      name=args.name, gpus=args.gpus, mpi=args.mpi)
    # SIGTERM (kill, systemd, a job scheduler) stops as cleanly as Ctrl-C.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.perf_counter()
    try:
        cluster.start()
    except KeyboardInterrupt:
        print(cluster.why_start_interrupted(), file=sys.stderr, flush=True)
        return 130
    with cluster:
        print(f"{cluster.name}: {len(cluster.engine_ids)} {cluster.engine_kind} engines on "
              f"{cluster.backend_kind}, ready in {time.perf_counter() - t0:.1f} s. "
              f"Press Ctrl-C to stop.", flush=True)
        try:
            # Until Ctrl-C, or until the cluster ends from outside (`cloudlab stop`, a killed
            # controller), which its supervisor notices within a second.
            while cluster.state == "running":
                time.sleep(0.5)
        except KeyboardInterrupt:
            print(f"Stopping {cluster.name}...", flush=True)
    if cluster.state == "dead":
        print(f"{cluster.name} ended from outside: {cluster.end_cause}.", flush=True)
        return 1
    print(f"Stopped {cluster.name}.")
    return 0


def cmd_list(args) -> int:
    from .registry import read_records

    records = read_records()
    if not records:
        print("No clusters are running.")
    for r in records:
        age = time.time() - r.created
        print(f"{r.name:<14} {r.engine:<12} {r.backend:<8} {r.engines:>4} engines  "
              f"owner pid {r.owner_pid}  up {age:.0f} s")
    return 0


def cmd_stop(args) -> int:
    from .registry import read_records, stop_record

    records = read_records()
    if args.all:
        chosen = records
    elif args.name:
        chosen = [r for r in records if r.name == args.name]
        if not chosen:
            print(f"cloudlab: no running cluster named {args.name!r}; `cloudlab list` shows "
                  f"what runs.", file=sys.stderr)
            return 2
    else:
        print("cloudlab: name a cluster to stop, or use --all; `cloudlab list` shows what runs.",
              file=sys.stderr)
        return 2
    for record in chosen:
        stop_record(record)
        print(f"Stopped {record.name}.")
    if not chosen:
        print("No clusters are running.")
    return 0


def _backend_of(profile):
    from .plugins import backend_class

    return backend_class(profile.cluster.backend)



def cmd_doctor(args) -> int:
    from .profiles import load_profile

    profile = load_profile(args.profile)
    backend = _backend_of(profile)
    t0 = time.perf_counter()
    checks = backend.doctor(profile.backend_options, args.engines or profile.cluster.engines)
    if checks is None:
        print(f"cloudlab doctor: profile {args.profile} uses the {backend.name} backend, which "
              f"has nothing to check before a start (`cloudlab start` says what fails).",
              file=sys.stderr)
        return 2
    for check in checks:
        print(check)
    failed = [c for c in checks if c.ok is False]
    print(f"{len(checks) - len(failed)} of {len(checks)} checks passed in "
          f"{time.perf_counter() - t0:.1f} s" + (f"; fix the {len(failed)} above marked FAIL."
                                                 if failed else "."))
    return 1 if failed else 0


def cmd_gc(args) -> int:
    """Expired resources go, whoever made them; this machine's own go once their cluster no
    longer runs here (a killed kernel). Another machine's stay until they expire. A place
    that cannot be cleaned (no credentials) is said in one line; the others are cleaned."""
    from .profiles import available_profiles, load_profile
    from .registry import read_records

    if args.profile:
        profiles = [load_profile(args.profile)]
        if _backend_of(profiles[0]).garbage_place(profiles[0].backend_options) is None:
            print(f"cloudlab gc: profile {args.profile} uses the "
                  f"{profiles[0].cluster.backend} backend, which leaves nothing behind to "
                  f"clean.", file=sys.stderr)
            return 2
    else:
        profiles = []
        for name in sorted(available_profiles()):
            try:
                profiles.append(load_profile(name))
            except CloudlabError:
                continue  # (a broken profile is `cloudlab profiles`' to report)
    # Where resources may be -> (the place in words, its backend, options to clean with).
    places: dict[tuple, tuple[str, type[Backend], object]] = {}
    for profile in profiles:
        backend = _backend_of(profile)
        place = backend.garbage_place(profile.backend_options)
        if place is not None:
            key, where = place
            places.setdefault((backend.name, key), (where, backend, profile.backend_options))
    live = {r.name for r in read_records()}
    found, cleaned, failed = 0, [], 0
    for where, backend, options in sorted(places.values(), key=lambda p: p[0]):
        try:
            lines = backend.collect_garbage(options, live, args.dry_run)
        except CloudlabError as e:
            print(f"cloudlab gc: cannot clean {where}: {e}", file=sys.stderr)
            failed += 1
            continue
        except Exception as e:  # the SDKs': no credentials, no network, no permission
            print(f"cloudlab gc: cannot clean {where} ({type(e).__name__}: {e}); check your "
                  f"credentials (`cloudlab doctor --profile ...` says more).", file=sys.stderr)
            failed += 1
            continue
        found += len(lines)
        cleaned.append(where)
        for line in lines:
            print(f"{'would delete' if args.dry_run else 'deleted'} in {where}: {line}")
    if cleaned or not failed:
        names = ", ".join(cleaned) or "no place (no profile's backend leaves resources behind)"
        print(f"{found} resources {'to delete' if args.dry_run else 'deleted'} in {names}.")
    return 2 if failed else 0


def cmd_profiles(args) -> int:
    import tomllib

    from .profiles import available_profiles

    for name, path in available_profiles().items():
        try:
            description = tomllib.loads(path.read_text()).get("description", "")
        except (OSError, tomllib.TOMLDecodeError):
            description = "(not valid TOML)"
        print(f"{name:<14} {description}  [{path}]")
    return 0


def cmd_bench(args) -> int:
    from . import bench

    try:
        report = bench.run(quick=args.quick, reps=args.reps, only=args.only, out=args.out,
                           log=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as e:
        print(f"cloudlab bench: {e}", file=sys.stderr)
        return 2
    print(report.table())
    print(f"Wrote {report.files['json']} and {report.files['png']} "
          f"({report.seconds:.0f} s).")
    # Only a ratio regression fails the run: absolute times depend on the machine.
    return 1 if report.regressions else 0


def cmd_run(args) -> int:
    from .cluster import Cluster

    module = workload_module(args.workload)
    if hasattr(module, "prepare"):
        try:
            args.inputs = module.prepare(args)
        except (ValueError, OSError) as e:  # bad input: say so before anything starts
            print(f"cloudlab run {args.workload}: {e}", file=sys.stderr)
            return 2
    # A workload may need a cluster of its own kind (the MPI ring: one MPI job of --ranks).
    extra = {"mpi": args.mpi}
    extra.update(module.cluster_options(args) if hasattr(module, "cluster_options") else {})
    cluster = Cluster(extra.pop("n", args.engines), engine=args.engine, profile=args.profile,
                      backend=args.backend, gpus=args.gpus, **extra)
    t0 = time.perf_counter()
    try:
        with cluster:
            if not args.json:
                print(f"Started {len(cluster.engine_ids)} {cluster.engine_kind} engines on "
                      f"{cluster.backend_kind} in {time.perf_counter() - t0:.1f} s.", flush=True)
            result = module.run(cluster, args)
    except ValueError as e:  # an option the workload refuses (the cluster has stopped)
        print(f"cloudlab run {args.workload}: {e}", file=sys.stderr)
        return 2
    result = {"workload": args.workload, "engine": cluster.engine_kind,
              "backend": cluster.backend_kind, **result}
    if args.json:
        print(json.dumps(result))
    else:
        print(module.summary(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())

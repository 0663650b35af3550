"""IPython magics: ``%cluster``, ``%push``, ``%pull`` and ``%%everywhere``.

Magics parse, delegate to :class:`~cloudlab.Cluster`, and turn misuse into one
``UsageError`` line. The most recently started cluster is the *active* one; it
is also bound to ``cluster`` in the notebook. For ipyparallel clusters,
ipyparallel's own ``%px`` family is activated on the active cluster too.
"""

from __future__ import annotations

import argparse
import shlex
import time

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class
from IPython.display import display

from .cluster import Cluster, running_clusters
from .errors import CloudlabError, ConfigError
from .output import PrefixedSink
from .widgets import install as install_views
from .widgets import widgets_available

CLUSTER_HELP = """Start, inspect, resize and stop parallel engines.

    %cluster start [N] [--engine ipyparallel|dask] [--profile NAME] [--backend NAME] [--name NAME]
                   [--gpus all|N] [--mpi]
        Start N engines (default: the profile's `engines`; local: one per core) and make
        this cluster the active one; it is also bound to the name `cluster` in the notebook.
        --name: the cluster's name (default: like ipp-1a2b3c).
        Profiles are profiles/*.toml and ~/.cloudlab/profiles/*.toml (default: local).
        --gpus: one engine per GPU (all of them, or the first N), each seeing only its own.
        --mpi: the engines are the ranks of one MPI job (mpirun; mpi4py's COMM_WORLD),
        of fixed size (local and ssh backends).
    %cluster status [NAME]        Each engine: id, host, pid, state (queued/starting/idle/busy/
                                  dead); a queued engine says why it waits (a Slurm reason).
    %cluster scale N [NAME]       Grow or shrink the active (or named) cluster to N engines.
    %cluster stop [NAME] [--all]  Stop the active (or named) cluster; --all stops every one.
    %cluster list                 Clusters started in this kernel; * marks the active one.
    %cluster sync [NAME]          Send your own modules (files beside the notebook, editable
                                  installs) to every engine now; calls that send work do it
                                  by themselves when one was imported or edited since.

Related magics:
    %push x y       Copy notebook variables x and y into every engine's namespace.
    %pull x         The value of x on each engine, as {engine id: value}.
    %%everywhere    Run the cell on every engine, streaming each engine's output
                    as it happens ([id] prefixes). Option: --targets 0,2-3.

Python API: the same cluster as `cloudlab.Cluster` (c.map, c.submit, c.push, ...).
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports misuse as an IPython UsageError instead of exiting."""

    def error(self, message):
        raise UsageError(f"%cluster: {message}. See %cluster? for usage.")


def _parser() -> _Parser:
    parser = _Parser(prog="%cluster", add_help=False)
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    start = sub.add_parser("start", add_help=False)
    start.add_argument("n", nargs="?")
    start.add_argument("--engine")
    start.add_argument("--profile")
    start.add_argument("--backend")
    start.add_argument("--name")
    start.add_argument("--gpus")
    start.add_argument("--mpi", action="store_true")
    for name in ("status", "list", "sync"):
        p = sub.add_parser(name, add_help=False)
        if name != "list":
            p.add_argument("name", nargs="?")
    scale = sub.add_parser("scale", add_help=False)
    scale.add_argument("n")
    scale.add_argument("name", nargs="?")
    stop = sub.add_parser("stop", add_help=False)
    stop.add_argument("name", nargs="?")
    stop.add_argument("--all", action="store_true")
    return parser


def parse_targets(text: str) -> list[int]:
    """'0,2-3' -> [0, 2, 3]."""
    ids: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            ids.extend(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UsageError(f"--targets takes engine ids like 0,2-3, not {text!r}.") from None
    return ids


@magics_class
class ClusterMagics(Magics):
    active: Cluster | None = None

    # ------------------------------------------------------------ %cluster
    @line_magic
    def cluster(self, line: str = ""):
        try:
            args = _parser().parse_args(shlex.split(line))
        except ValueError as e:  # unbalanced quotes
            raise UsageError(f"%cluster: {e}. See %cluster? for usage.") from None
        if args.command is None:
            raise UsageError("%cluster needs a command: start, status, scale, stop, list or sync. "
                             "See %cluster? for usage.")
        try:
            return getattr(self, f"_cluster_{args.command}")(args)
        except CloudlabError as e:
            if isinstance(e, ConfigError):
                raise UsageError(str(e)) from None
            raise

    cluster.__doc__ = CLUSTER_HELP

    def _cluster_start(self, args):
        t0 = time.perf_counter()
        c = Cluster(args.n, engine=args.engine, backend=args.backend, profile=args.profile,
                    name=args.name, gpus=args.gpus, mpi=True if args.mpi else None)
        print(f"Starting {c.n} {c.engine_kind} engines on {c.backend_kind}...", flush=True)
        try:
            c.start()
        except KeyboardInterrupt:  # (Kernel > Interrupt): a sentence, not a traceback
            raise UsageError(c.why_start_interrupted()) from None
        self._activate(c)
        print(f"Started {c.name}: {len(c.engine_ids)} {c.engine_kind} engines on "
              f"{c.backend_kind} in {time.perf_counter() - t0:.1f} s; it is the active "
              f"cluster, bound to `cluster`.")
        if widgets_available(self.shell):
            display(c)  # the live cluster widget

    def _cluster_status(self, args):
        c = self._find(args.name)
        rows = c.status()
        counts = {s: sum(r.state == s for r in rows) for s in ("idle", "busy", "starting", "dead")}
        print(f"{c.name}: {c.engine_kind} on {c.backend_kind}, {len(rows)} engines ("
              + ", ".join(f"{v} {k}" for k, v in counts.items() if v) + ")")
        print(f"{'id':>4}  {'host':<20} {'pid':>8}  state")
        for r in rows:
            print(f"{r.id:>4}  {r.host:<20} {r.pid or '':>8}  {r.state}")

    def _cluster_scale(self, args):
        c = self._find(args.name)
        before = len(c.engine_ids)
        c.scale(args.n)
        print(f"{c.name}: {before} -> {len(c.engine_ids)} engines.")

    def _cluster_stop(self, args):
        if not running_clusters():
            raise UsageError("No cluster is running, so there is nothing to stop.")
        targets = running_clusters() if args.all else [self._find(args.name)]
        for c in targets:
            c.stop()
            print(f"Stopped {c.name}.")
        self._activate(None)

    def _cluster_sync(self, args):
        c = self._find(args.name)
        code = c.sync()
        if code is None:
            print("None of your own modules is imported here, so there is nothing to send (a "
                  "module beside the notebook, or installed editable, is sent once imported).")
        else:
            print(f"{c.name}: its {len(c.engine_ids)} engines have {code.describe()}.")

    def _cluster_list(self, args):
        clusters = running_clusters()
        if not clusters:
            print("No clusters are running in this kernel; start one with %cluster start N.")
        for c in clusters:
            mark = "*" if c is ClusterMagics.active else " "
            print(f"{mark} {c.name:<14} {c.engine_kind:<12} {c.backend_kind:<8} "
                  f"{len(c.engine_ids):>4} engines  {c.state}")

    def _find(self, name: str | None) -> Cluster:
        clusters = running_clusters()
        if name:
            for c in clusters:
                if c.name == name:
                    return c
            raise UsageError(f"No running cluster named {name!r}; running: "
                             f"{', '.join(c.name for c in clusters) or 'none'}.")
        active = ClusterMagics.active
        if active is None or active not in clusters:
            raise UsageError("No cluster is running: start one with %cluster start N first.")
        return active

    def _activate(self, c: Cluster | None) -> None:
        """Make ``c`` (or, if None, the newest running cluster) active, bound to ``cluster``."""
        if c is None:
            running = running_clusters()
            c = running[-1] if running else None
        ClusterMagics.active = c
        assert self.shell is not None  # registered with one: see load_ipython_extension
        if c is None:
            self.shell.user_ns.pop("cluster", None)
            return
        self.shell.user_ns["cluster"] = c
        if c.engine_kind == "ipyparallel":
            c.client.activate()  # ipyparallel's %px, %%px, %autopx on this cluster

    # ------------------------------------------------------- %push / %pull
    @line_magic
    def push(self, line: str = ""):
        """%push x y: copy notebook variables into every engine's namespace."""
        names = line.split()
        if not names:
            raise UsageError("%push needs variable names, like %push data weights.")
        assert self.shell is not None  # registered with one: see load_ipython_extension
        missing = [n for n in names if n not in self.shell.user_ns]
        if missing:
            raise UsageError(f"{missing[0]!r} is not defined in this notebook; define it "
                             f"before %push (nothing was pushed).")
        c = self._find(None)
        c.push(**{n: self.shell.user_ns[n] for n in names})
        print(f"Pushed {', '.join(names)} to {len(c.engine_ids)} engines of {c.name}.")

    @line_magic
    def pull(self, line: str = ""):
        """%pull x: the value of x on each engine, as {engine id: value}."""
        names = line.split()
        if len(names) != 1:
            raise UsageError("%pull takes one variable name, like %pull result.")
        return self._find(None).pull(names[0])

    # -------------------------------------------------------- %%everywhere
    @cell_magic
    def everywhere(self, line: str, cell: str):
        """%%everywhere [--targets 0,2-3]: run the cell on every engine, streaming output."""
        words = line.split()
        targets = None
        if words[:1] == ["--targets"] and len(words) == 2:
            targets = parse_targets(words[1])
        elif words:
            raise UsageError("%%everywhere takes only --targets IDS, like --targets 0,2-3.")
        try:
            self._find(None).execute(cell, sink=PrefixedSink(), targets=targets)
        except ValueError as e:  # an engine id the cluster does not have
            raise UsageError(str(e)) from None


def register(ipython) -> None:
    ipython.register_magics(ClusterMagics)
    install_views(ipython)


def unregister(ipython) -> None:
    magics = ipython.magics_manager.registry.get("ClusterMagics")
    if magics is not None:
        for kind in ("line", "cell"):
            for name in list(ipython.magics_manager.magics[kind]):
                if getattr(ipython.magics_manager.magics[kind][name], "__self__", None) is magics:
                    del ipython.magics_manager.magics[kind][name]

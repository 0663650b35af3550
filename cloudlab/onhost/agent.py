"""Engine-side launcher: run an engine's entry point under a lease on its owner.

Every process a backend starts (controller, scheduler, engine, worker) is::

    python -m cloudlab.onhost.agent --owner-pid PID [--cleanup PATH ...] [--title T] -- module:function ARGS...
    python -m cloudlab.onhost.agent --lease SECONDS ...        (an owner on another machine)
    python -m cloudlab.onhost.agent --lease SECONDS --lease-from HOST:PORT ...   (one it is not
                                                        started by: a batch scheduler's job)

The agent forks: the child calls ``module:function`` with ``sys.argv`` set to
``ARGS`` and becomes the engine; the agent stays its lease keeper, a small
process that holds the lease and ends as its engine ends (same exit code or
signal). The keeper must be a process apart: a watchdog thread inside the engine
freezes with it (SIGSTOP, a debugger, a stopped job), and a frozen engine whose
owner then dies would stay for ever, holding its memory. (The fork server,
:mod:`cloudlab.onhost.forkserver`, calls :func:`run` in each child it forks; there the
server, which outlives a frozen child, is the process apart, and a thread holds the
lease.) When the owner (the kernel or script that started the cluster) exits for
any reason, kill -9 included, the keeper removes the ``--cleanup`` paths and kills
its whole process group (the backend starts each process as a group leader), so
nothing outlives its owner. An owner on another machine cannot be watched by its pid: there
the lease is ``--lease SECONDS`` on standard input, which the owner keeps open (through
ssh, say) and writes a heartbeat to every fraction of a lease. When the heartbeats stop for
a whole lease (the link is cut) or the input closes (the owner, or its ssh, is gone), the
keeper ends everything as above. A process started by someone else for the owner (a Slurm
job) takes its lease over a TCP connection it opens to the owner (``--lease-from``), which
the owner writes heartbeats to in the same way; a refused connection means the owner has
gone already.

Where the environment sets a memory limit (``CLOUDLAB_MEMORY_LIMIT_MB``), a
second thread checks the process's private resident memory every 50 ms and,
past the limit, leaves its last words (why it ends, in the file named by
``CLOUDLAB_LAST_WORDS``) and kills its group: one engine ends, not the
machine's memory and the notebook with it.
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import select
import shutil
import signal
import socket
import sys
import threading
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_everything(cleanup: list[str]) -> None:
    """The owner is gone: remove our files and kill our process group, now."""
    for path in cleanup:
        shutil.rmtree(path, ignore_errors=True) if os.path.isdir(path) else _unlink(path)
    if os.getpgrp() in (os.getpid(), os.getppid()):  # led by this process, or its keeper
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


#: Environment: a file the agent touches at each heartbeat (a cloud VM powers itself off
#: once no engine on it has touched it for a while: backends/_vm.py).
LEASE_FILE = "CLOUDLAB_LEASE_FILE"


def _touch(path: str | None) -> None:
    if path:
        try:
            os.utime(path)
        except OSError:
            pass


def lease_connection(address: str, timeout: float = 10.0) -> socket.socket | None:
    """A connection to the owner's lease server at ``host:port`` (None: it refused, or did
    not answer within ``timeout``: the owner is gone)."""
    host, _, port = address.rpartition(":")
    try:
        return socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
    except (OSError, ValueError):
        return None


class Lease:
    """What a process lives under: its owner's pid on this machine, or heartbeats every
    fraction of ``seconds`` on standard input or on a connection to ``lease_from``."""

    def __init__(self, owner_pid: int | None, seconds: float | None = None,
                 lease_from: str | None = None):
        assert (owner_pid is None) != (seconds is None)  # (the command line says so)
        self.owner_pid, self.seconds = owner_pid, seconds
        self.connection = lease_connection(lease_from) if lease_from is not None else None
        #: Lapsed already: the owner has exited, or refused the connection.
        self.lapsed = (not _alive(owner_pid) if owner_pid is not None else
                       lease_from is not None and self.connection is None)

    @property
    def heartbeats(self) -> int:
        """The descriptor the heartbeats arrive on."""
        return 0 if self.connection is None else self.connection.fileno()

    def wait(self, engine: int | None = None) -> int | None:
        """Block until the lease lapses (None) or, where given, the child ``engine`` ends
        first (its wait status)."""
        poller = select.poll()
        look_every = None  # seconds between looks where no pidfd wakes us (old kernels)
        if engine is not None:
            try:
                poller.register(os.pidfd_open(engine), select.POLLIN)
            except (AttributeError, OSError):
                look_every = 0.5
        owner = None
        if self.owner_pid is not None:
            try:
                owner = os.pidfd_open(self.owner_pid)
                poller.register(owner, select.POLLIN)
            except ProcessLookupError:
                return None
            except (AttributeError, OSError):
                look_every = 0.5
        else:
            poller.register(self.heartbeats, select.POLLIN)
        lease_file = os.environ.get(LEASE_FILE)
        _touch(lease_file)  # the lease starts now (for an owner that dies before its first beat)
        silent_since = time.monotonic()
        while True:
            wait = look_every
            if self.seconds is not None:
                left = max(0.0, silent_since + self.seconds - time.monotonic())
                wait = left if wait is None else min(left, wait)
            events = dict(poller.poll(None if wait is None else wait * 1000))
            if engine is not None:
                pid, status = os.waitpid(engine, os.WNOHANG)
                if pid:
                    return status
            if self.owner_pid is not None:
                if owner in events or (owner is None and not _alive(self.owner_pid)):
                    return None  # the owner has exited
            elif self.heartbeats in events:
                if not os.read(self.heartbeats, 4096):
                    return None  # closed: the owner (or the connection it held) is gone
                silent_since = time.monotonic()
                _touch(lease_file)
            elif time.monotonic() - silent_since >= (self.seconds or 0.0):
                return None  # silent for a whole lease: the link is cut, or the owner hangs

    def leave_to_keeper(self) -> None:
        """In the kept process: the lease is its keeper's to read."""
        if self.connection is not None:
            self.connection.close()
        elif self.seconds is not None:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.close(null)


def watch_in_thread(lease: Lease, cleanup: list[str]) -> None:
    """End everything when ``lease`` lapses, from a thread of this process (where something
    outside it, a fork server, ends it if it is frozen)."""
    if lease.lapsed:
        end_everything(cleanup)

    def watch() -> None:  # (it holds the lease's connection open)
        lease.wait()
        end_everything(cleanup)

    threading.Thread(target=watch, name="cloudlab-lease", daemon=True).start()


#: The keeper's title: its engine's, then this.
KEEPER = "(lease keeper)"


def keep_apart(lease: Lease, cleanup: list[str], title: str | None) -> None:
    """Fork: the child returns, to become the engine; this process stays its keeper, and
    never returns. A thread of the engine would freeze with it (SIGSTOP, a debugger): the
    keeper does not, and ends the engine's whole group when the lease lapses. It ends as
    its engine ended (the same exit code or signal), so whoever started it sees the
    engine's end; killed itself, it takes the engine with it."""
    if lease.lapsed:
        end_everything(cleanup)
    sys.stdout.flush()
    sys.stderr.flush()
    keeper = os.getpid()
    engine = os.fork()
    if engine == 0:
        _die_with(keeper)
        lease.leave_to_keeper()
        return
    try:
        # Signals for the engine reach it through its group, as cloudlab sends them; a
        # terminal's or a scheduler's must not end the keeper before its engine.
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        if title:
            set_title(f"{title} {KEEPER}")
        status = lease.wait(engine)
    except BaseException:
        status = None
    if status is None:  # the lease lapsed (or the keeper failed): nothing outlives it
        end_everything(cleanup)
    _end_as(status)


def _die_with(keeper: int) -> None:
    """Ask Linux to SIGKILL this process when ``keeper``, its parent, dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # (not Linux: the keeper's lease still ends it)
        return
    if os.getppid() != keeper:  # it died before the request
        os.kill(os.getpid(), signal.SIGKILL)


PR_SET_PDEATHSIG = 1


def _end_as(status: int | None) -> None:
    """Exit as a child with wait status ``status`` did: the same code, or the same signal."""
    if status is None or os.WIFSIGNALED(status):
        sig = signal.SIGKILL if status is None else os.WTERMSIG(status)
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # (its engine dumped any core)
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)  # (a signal that does not end a process)
    os._exit(os.waitstatus_to_exitcode(status))


#: Environment: the file a process writes why it ended itself, for its cluster to read.
LAST_WORDS = "CLOUDLAB_LAST_WORDS"
#: Environment: private resident memory, in MB (10**6 bytes), past which an engine ends itself.
MEMORY_LIMIT = "CLOUDLAB_MEMORY_LIMIT_MB"
MEMORY_CHECK_SECONDS = 0.05


def private_memory_mb(statm: int) -> float:
    """Resident memory not shared with other processes, in MB of 10**6 bytes (``statm``
    is an open ``/proc/self/statm``): arrays pushed through shared memory do not count."""
    fields = os.pread(statm, 256, 0).split()
    return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE") / 1e6


def leave_last_words(text: str) -> None:
    path = os.environ.get(LAST_WORDS)
    if path:
        try:
            with open(path, "w") as out:
                out.write(text + "\n")
        except OSError:
            pass


def start_memory_guard(limit_mb: float) -> None:
    statm = os.open("/proc/self/statm", os.O_RDONLY)

    def guard() -> None:
        while True:
            used = private_memory_mb(statm)
            if used > limit_mb:
                leave_last_words(f"ran out of memory: it held {used:,.0f} MB, over its "
                                 f"memory_limit of {limit_mb:,.0f} MB")
                end_everything([])
            time.sleep(MEMORY_CHECK_SECONDS)

    threading.Thread(target=guard, name="cloudlab-memory-guard", daemon=True).start()


def set_title(title: str) -> None:
    """Name the process as ``ps`` and ``top`` show it (``cloudlab: ipp-1a2b3c engine-3``)."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)
    # The short name (/proc/PID/comm, 15 bytes) without spaces: tools that parse
    # /proc/PID/stat word by word (Slurm's proctrack/linuxproc) would not find the process's
    # parent, and never signal it.
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(title.replace(" ", "")[:15])
    except OSError:  # (no /proc: not Linux)
        pass


def resolve(entry: str):
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cloudlab.onhost.agent")
    owner = parser.add_mutually_exclusive_group(required=True)
    owner.add_argument("--owner-pid", type=int, help="the owner, a process on this machine")
    owner.add_argument("--lease", type=float,
                       help="seconds without a heartbeat on standard input before ending")
    parser.add_argument("--lease-from", metavar="HOST:PORT",
                        help="with --lease: the heartbeats come on a connection to this address")
    parser.add_argument("--cleanup", action="append", default=[])
    parser.add_argument("--title", help="process title, as ps shows it")
    parser.add_argument("entry", help="module:function to run in this process")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    if ns.lease_from and ns.lease is None:
        parser.error("--lease-from needs --lease SECONDS")
    sys.exit(run(ns.owner_pid, ns.cleanup, ns.entry, args, ns.title, ns.lease, ns.lease_from))


def run(owner_pid: int | None, cleanup: list[str], entry: str, args: list[str],
        title: str | None = None, lease: float | None = None,
        lease_from: str | None = None, kept_from_outside: bool = False) -> int:
    """Call ``entry`` with ``sys.argv`` set to ``args``, under a lease on ``owner_pid`` (or,
    with ``lease``, on the heartbeats arriving on standard input or from ``lease_from``),
    which a keeper process holds (``kept_from_outside``: a thread, where something outside
    this process, a fork server, ends it when it is frozen)."""
    held = Lease(owner_pid, lease, lease_from)
    if lease is not None:
        # On another machine: the environment cloudlab keeps there (if this is one) is in
        # use, so the host keeps it when it removes older ones.
        from .hostenv import MARKER

        _touch(os.path.join(sys.prefix, MARKER))
    if kept_from_outside:
        watch_in_thread(held, cleanup)
    else:
        keep_apart(held, cleanup, title)
    os.umask(0o077)  # connection files, keys and logs: the owner's only
    if os.environ.get(MEMORY_LIMIT):
        start_memory_guard(float(os.environ[MEMORY_LIMIT]))
    if title:
        set_title(title)
    sys.argv = [entry.partition(":")[0], *args]
    result = resolve(entry)()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    main()

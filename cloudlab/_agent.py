"""Engine-side launcher: run an engine's entry point under a lease on its owner.

Every process a backend starts (controller, scheduler, engine, worker) is::

    python -m cloudlab._agent --owner-pid PID [--cleanup PATH ...] [--title T] -- module:function ARGS...

The agent starts a watchdog thread, then calls ``module:function`` in the same
process with ``sys.argv`` set to ``ARGS``: no extra process per engine. (The
fork server, :mod:`cloudlab._forkserver`, calls :func:`run` in each child it
forks, so both ways of starting a process end in the same code.) When the
owner (the kernel or script that started the cluster) exits for any reason,
kill -9 included, the watchdog removes the ``--cleanup`` paths and kills its
whole process group (the backend starts each process as a group leader), so
nothing outlives its owner. Remote backends will add other lease kinds here.
"""

from __future__ import annotations

import argparse
import importlib
import os
import select
import shutil
import signal
import sys
import threading
import time


def owner_gone(pid: int) -> None:
    """Block until process ``pid`` has exited (returns at once if it already has)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    except (AttributeError, OSError):  # no pidfd (old kernel): poll instead
        while _alive(pid):
            time.sleep(0.5)
        return
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll(None):
        pass
    os.close(fd)


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
    if os.getpgrp() == os.getpid():
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def start_watchdog(owner_pid: int, cleanup: list[str]) -> None:
    def watch() -> None:
        owner_gone(owner_pid)
        end_everything(cleanup)

    threading.Thread(target=watch, name="cloudlab-lease", daemon=True).start()


def set_title(title: str) -> None:
    """Name the process as ``ps`` and ``top`` show it (``cloudlab: ipp-1a2b3c engine-3``)."""
    try:
        import setproctitle
    except ImportError:
        return
    setproctitle.setproctitle(title)


def resolve(entry: str):
    module, _, function = entry.partition(":")
    return getattr(importlib.import_module(module), function)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cloudlab._agent")
    parser.add_argument("--owner-pid", type=int, required=True)
    parser.add_argument("--cleanup", action="append", default=[])
    parser.add_argument("--title", help="process title, as ps shows it")
    parser.add_argument("entry", help="module:function to run in this process")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    args = ns.args[1:] if ns.args[:1] == ["--"] else ns.args
    sys.exit(run(ns.owner_pid, ns.cleanup, ns.entry, args, ns.title))


def run(owner_pid: int, cleanup: list[str], entry: str, args: list[str],
        title: str | None = None) -> int:
    """Call ``entry`` with ``sys.argv`` set to ``args``, under a lease on ``owner_pid``."""
    if not _alive(owner_pid):
        end_everything(cleanup)
    start_watchdog(owner_pid, cleanup)
    if title:
        set_title(title)
    sys.argv = [entry.partition(":")[0], *args]
    result = resolve(entry)()
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    main()

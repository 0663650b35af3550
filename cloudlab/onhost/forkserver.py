"""Fork server: engines start in milliseconds from a process that has already imported them.

A fresh engine spends most of its start importing ipyparallel or distributed
(0.4-0.7 s of CPU); sixteen of them importing at once on two cores take
seconds. The fork server imports an engine kind's modules once, then forks
one child per process it is asked for::

    python -m cloudlab.onhost.forkserver --owner-pid PID [--preload MODULE ...]

Each child becomes the leader of a new session (its own process group, like
every process cloudlab starts), points stdin at /dev/null and stdout/stderr
at its log, takes the environment and working directory it was asked for,
reseeds NumPy's global generator (a forked child would otherwise repeat its
siblings' random numbers), and runs its entry point through
:func:`cloudlab.onhost.agent.run`, under the same lease as an agent-started process.

Protocol, one JSON object per line. The server writes ``{"ready": true}`` once
its preloads are imported. Each request on stdin, ``{"entry", "args", "env",
"cwd", "log", "cleanup", "title"}``, is answered in order with ``{"pid": P}``
or ``{"error": text}``; each child's end is reported as ``{"exited": P,
"code": C}``. The server exits when stdin closes or its owner dies; children
keep their own lease (a thread) and die with the owner too. A child that is frozen
(SIGSTOP) cannot act on its lease, the thread frozen with it: the server, which is
not, ends whatever is left when it ends.
"""

from __future__ import annotations

import argparse
import atexit
import gc
import importlib
import json
import os
import select
import signal
import sys
import time
import traceback

#: Seconds children get to end by their own lease before the server ends them.
CHILDREN_GRACE = 2.0


class Server:
    def __init__(self, owner_pid: int):
        self.owner_pid = owner_pid
        # Replies get a descriptor of their own; fd 1 then points at the log, like fd 2,
        # so a stray print in a preloaded module cannot corrupt the protocol.
        self.replies = os.dup(1)
        os.dup2(2, 1)
        self.children: dict[int, int] = {}  # pidfd -> pid
        self.buffer = b""

    def reply(self, message: dict) -> None:
        os.write(self.replies, json.dumps(message).encode() + b"\n")

    def serve(self) -> None:
        try:
            owner = os.pidfd_open(self.owner_pid)
        except ProcessLookupError:
            return
        poller = select.poll()
        poller.register(0, select.POLLIN)
        poller.register(owner, select.POLLIN)
        while True:
            for fd, _ in poller.poll():
                if fd == owner:
                    return
                if fd == 0:
                    if not self.read_requests(poller):
                        return
                else:
                    self.reap(fd, poller)

    def end_children(self, grace: float = CHILDREN_GRACE) -> None:
        """The server ends (its owner died, or closed it): children its owner left end by
        their own lease within a moment; those still there after ``grace`` seconds (frozen)
        are killed with their process group (SIGKILL ends a stopped process)."""
        deadline = time.monotonic() + grace
        while self.children and (left := deadline - time.monotonic()) > 0:
            for pidfd in select.select(list(self.children), [], [], left)[0]:
                os.waitpid(self.children.pop(pidfd), 0)
                os.close(pidfd)
        for pid in self.children.values():
            for kill in (os.killpg, os.kill):  # (the child itself: stopped before its setsid)
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass

    def read_requests(self, poller: select.poll) -> bool:
        data = os.read(0, 65536)
        if not data:
            return False
        self.buffer += data
        while b"\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\n", 1)
            try:
                pid = self.fork(json.loads(line))
            except Exception as e:  # a bad request must not end the server
                self.reply({"error": f"{type(e).__name__}: {e}"})
                continue
            pidfd = os.pidfd_open(pid)
            self.children[pidfd] = pid
            poller.register(pidfd, select.POLLIN)
            self.reply({"pid": pid})
        return True

    def reap(self, pidfd: int, poller: select.poll) -> None:
        poller.unregister(pidfd)
        os.close(pidfd)
        pid = self.children.pop(pidfd)
        _, status = os.waitpid(pid, 0)
        self.reply({"exited": pid, "code": os.waitstatus_to_exitcode(status)})

    def fork(self, request: dict) -> int:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid:
            os.close(log)
            return pid
        code = 1
        try:
            for fd in (self.replies, *self.children):
                os.close(fd)
            become(request, log)
            code = _agent_run(self.owner_pid, request)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc()
        finally:
            try:
                atexit._run_exitfuncs()
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)


def become(request: dict, log: int) -> None:
    """Turn a fresh fork into the process ``request`` describes."""
    os.setsid()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(null)
    os.close(log)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    # As a fresh `python -m` would have it: the working directory first, then PYTHONPATH.
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:1] = [request["cwd"], *(p for p in extra if p not in sys.path)]
    if "numpy.random" in sys.modules:
        sys.modules["numpy.random"].seed()  # from the OS's entropy, not the server's state


def _agent_run(owner_pid: int, request: dict) -> int:
    from cloudlab.onhost import agent

    return agent.run(owner_pid, request.get("cleanup", []), request["entry"],
                      request.get("args", []), request.get("title"), kept_from_outside=True)


def threads_now() -> int:
    """OS threads of this process: forking is only safe while this is 1."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m cloudlab.onhost.forkserver")
    parser.add_argument("--owner-pid", type=int, required=True)
    parser.add_argument("--preload", action="append", default=[])
    parser.add_argument("--title")
    parser.add_argument("--cleanup", action="append", default=[],
                        help="files to remove when the server ends normally (its log)")
    ns = parser.parse_args(argv)
    server = Server(ns.owner_pid)
    from cloudlab.onhost import agent

    if ns.title:
        agent.set_title(ns.title)
    for module in ns.preload:
        importlib.import_module(module)
    # The preloaded modules' objects move to a generation the collector never scans: a
    # child's collections would otherwise walk them all, writing to each object's header
    # and so copying every page it shares with this server (CPython's advice for forks).
    gc.freeze()
    if threads_now() != 1:
        print(f"cloudlab fork server: {threads_now()} threads after preloading; children "
              f"forked now could inherit a held lock.", file=sys.stderr, flush=True)
    server.reply({"ready": True, "pid": os.getpid()})
    server.serve()
    server.end_children()
    for path in ns.cleanup:  # a server that failed keeps its log, for its owner to read
        try:
            os.unlink(path)
        except OSError:
            pass
    os._exit(0)  # at once: the preloaded modules have nothing to tidy for a server


if __name__ == "__main__":
    main()

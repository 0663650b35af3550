"""The queue and table of the queue form, where every engine of a cluster reaches them.

- Engines on this machine: a private Redis on loopback and a SQLite file.
- Engines that reach this machine (ssh hosts, Slurm nodes): a Redis on the address they
  reach the controller at, with a password made for the run; the rows go into it too.
- Engines that do not (behind a controller host, Azure VMs): the same Redis on loopback,
  which every engine's machine reaches on its own loopback through an SSH forward.
- EC2 VMs: an SQS queue and a DynamoDB table named for the cluster, which the VMs use by
  the instance role their cluster made for exactly such names (:class:`AwsScope`), never
  by a copy of the client's credentials.

Each is made for one run and removed after it. A Redis keeps nothing on disk; it ends
with the ``with`` block, or with this process if that dies first (it is this process's
child, told to exit when its parent does).
"""

from __future__ import annotations

import contextlib
import ipaddress
import secrets
import shutil
import socket
import subprocess
import time
import uuid

from ...backends.base import AwsScope, ServicePlace
from ...errors import ConfigError

NO_PLACE = ("The queue form needs a queue that every engine reaches, and this cluster's "
            "backend offers no way from its engines to this machine: pass queue_url and "
            "table_url (--queue-url, --table-url) naming a Redis they reach "
            "(redis://:PASSWORD@HOST:PORT/0?name=NAME), or use the cluster mode.")


def check_place(place: ServicePlace) -> None:
    """Raise ConfigError, before anything runs, where no queue can be made for the engines."""
    if place.aws is None and place.address is None and place.tunnel is None:
        raise ConfigError(NO_PLACE)


@contextlib.contextmanager
def queue_and_table(place: ServicePlace):
    """Yield ``((queue URL, table URL) here, (queue URL, table URL) on the engines)`` for
    one run: the same queue and table, as this client and as every engine reaches them."""
    check_place(place)
    run = uuid.uuid4().hex[:8]
    if place.aws is not None:
        with _aws_queue_and_table(place.aws, run) as urls:
            yield urls, urls
        return
    tunnelled = place.address is None  # through SSH: this machine's loopback on theirs
    bind = "127.0.0.1" if place.address is None else place.address
    local = not tunnelled and ipaddress.ip_address(bind).is_loopback
    with redis_server(bind=bind, password=None if local else secrets.token_urlsafe(24)) as url:
        if local:
            import tempfile

            with tempfile.TemporaryDirectory(prefix="cloudlab-classify-") as folder:
                urls = f"{url}?name=docs-{run}", f"sqlite:///{folder}/results.db"
                yield urls, urls
            return
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        if tunnelled:
            assert place.tunnel is not None  # (see check_place)
            reached = place.tunnel(port)
        else:
            reached = contextlib.nullcontext(port)
        with reached as there:
            theirs = url.replace(f":{port}/", f":{there}/")  # (where the engines reach it)
            yield ((f"{url}?name=docs-{run}", f"{url}?name=rows-{run}"),
                   (f"{theirs}?name=docs-{run}", f"{theirs}?name=rows-{run}"))


@contextlib.contextmanager
def _aws_queue_and_table(scope: AwsScope, run: str):
    from .queues import SqsQueue
    from .tables import DynamoTable

    name = f"{scope.prefix}classify-{run}"
    with contextlib.ExitStack() as stack:
        queue_url = SqsQueue.create(name, scope.endpoint, scope.region)
        stack.callback(SqsQueue.delete, queue_url)
        table_url = DynamoTable.create(name, scope.endpoint, scope.region)
        stack.callback(DynamoTable.delete, table_url)
        yield queue_url, table_url


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


@contextlib.contextmanager
def redis_server(timeout: float = 10.0, bind: str = "127.0.0.1", password: str | None = None):
    """Yield ``redis://[:PASSWORD@]ADDRESS:PORT/0`` while a private redis-server runs,
    answering on ``bind`` only (and to ``password`` only, where one is given)."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("The queue form needs redis-server, which is not installed: "
                           "install it (Debian: apt-get install redis-server) or pass queue_url.")
    with socket.socket() as s:
        s.bind((bind, 0))
        port = s.getsockname()[1]
    # The configuration comes on stdin ("-"), so the password is on no command line.
    process = subprocess.Popen(
        [binary, "-", "--bind", bind, "--port", str(port), "--save", "", "--appendonly", "no",
         "--protected-mode", "yes"], stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    assert process.stdin is not None  # a pipe
    process.stdin.write(f"requirepass {password}\n".encode() if password else b"")
    process.stdin.close()
    host = f"[{bind}]" if ":" in bind else bind
    url = f"redis://{f':{password}@' if password else ''}{host}:{port}/0"
    try:
        _wait_until_answering(url, process, timeout)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _die_with_parent() -> None:
    import ctypes
    import signal

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait_until_answering(url: str, process: subprocess.Popen, timeout: float) -> None:
    import redis

    deadline = time.monotonic() + timeout
    client = redis.Redis.from_url(url, socket_timeout=1)
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited at start (code {process.returncode}).")
        try:
            if client.ping():
                return
        except redis.exceptions.ConnectionError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer within {timeout:g} s.")
        time.sleep(0.02)

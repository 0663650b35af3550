"""A local Redis for the queue form: started on a free loopback port, stopped on exit.

For notebooks and tests on one machine (``with redis_server() as url: ...``). It keeps
nothing on disk and answers only on 127.0.0.1; the process ends with the ``with`` block, or
with this process if that dies first (it is this process's child, told to exit when its
parent does).
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time


def redis_available() -> bool:
    return shutil.which("redis-server") is not None


@contextlib.contextmanager
def redis_server(timeout: float = 10.0):
    """Yield ``redis://127.0.0.1:PORT/0`` while a private redis-server runs."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("The queue form needs redis-server, which is not installed: "
                           "install it (Debian: apt-get install redis-server) or pass queue_url.")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
         "--protected-mode", "yes"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_die_with_parent)
    url = f"redis://127.0.0.1:{port}/0"
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

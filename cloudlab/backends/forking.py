"""The owner's side of :mod:`cloudlab.onhost.forkserver`: start one, fork processes from it.

One fork server per (Python, engine kind) serves every cluster of this process:
it starts with the first cluster (or with :func:`cloudlab.prewarm`, which
``%load_ext cloudlab`` calls), outlives each cluster so the next start is
as fast, and ends with this process (its stdin closes; it also watches our
pid). It holds no engine; :func:`close_all` ends it early.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections import deque
from pathlib import Path

from ..errors import StartError

#: How long a fork server may take to import an engine kind's modules.
READY_TIMEOUT = 60.0

_servers: dict[tuple[str, tuple[str, ...]], ForkServer] = {}


class ForkServer:
    """A running fork server, driven from cloudlab's event loop."""

    def __init__(self, python: str, preload: tuple[str, ...], env: dict[str, str], log: Path):
        self.python, self.preload, self.log = python, preload, log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            self.popen = subprocess.Popen(
                [python, "-m", "cloudlab.onhost.forkserver", "--owner-pid", str(os.getpid()),
                 "--title", f"cloudlab fork server ({preload[0].partition('.')[0]}) of pid {os.getpid()}",
                 "--cleanup", str(log),
                 *(f"--preload={m}" for m in preload)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=out, env=env,
                start_new_session=True, close_fds=True,
            )
        assert self.popen.stdin is not None and self.popen.stdout is not None  # both are pipes
        self.stdin, self.stdout = self.popen.stdin, self.popen.stdout
        self.exit_codes: dict[int, int] = {}
        self.closed = False
        self._answers: deque[asyncio.Future] = deque()
        self._buffer = b""
        self._ready = asyncio.get_running_loop().create_future()
        os.set_blocking(self.stdout.fileno(), False)
        asyncio.get_running_loop().add_reader(self.stdout.fileno(), self._on_readable)

    async def wait_ready(self) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), READY_TIMEOUT)
        except asyncio.TimeoutError:
            self.close()
            raise StartError(f"The fork server did not import {', '.join(self.preload)} within "
                             f"{READY_TIMEOUT:g} s; see {self.log}.") from None

    async def fork(self, request: dict) -> int:
        """Start the process ``request`` describes (see :mod:`cloudlab.onhost.forkserver`); its pid."""
        await self.wait_ready()
        if self.closed:
            raise StartError(self._why_closed())
        answer = asyncio.get_running_loop().create_future()
        self._answers.append(answer)
        self.stdin.write(json.dumps(request).encode() + b"\n")
        self.stdin.flush()
        reply = await answer
        if "error" in reply:
            raise StartError(f"The fork server could not start {request.get('title')}: "
                             f"{reply['error']}")
        return reply["pid"]

    def _on_readable(self) -> None:
        try:
            data = os.read(self.stdout.fileno(), 65536)
        except BlockingIOError:
            return
        if not data:
            self._on_exit()
            return
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            message = json.loads(line)
            if "exited" in message:
                self.exit_codes[message["exited"]] = message["code"]
            elif "ready" in message:
                if not self._ready.done():
                    self._ready.set_result(None)
            elif self._answers:
                if "pid" in message:  # a new child: a code kept for its pid was an older one's
                    self.exit_codes.pop(message["pid"], None)
                self._answers.popleft().set_result(message)

    def _on_exit(self) -> None:
        asyncio.get_running_loop().remove_reader(self.stdout.fileno())
        try:
            self.popen.wait(1)  # it closed its end as it exited: reap it
        except subprocess.TimeoutExpired:
            pass
        self.stdout.close()
        self.stdin.close()
        self.closed = True
        _servers.pop((self.python, self.preload), None)
        error = StartError(self._why_closed())
        self.log.unlink(missing_ok=True)
        if not self._ready.done():
            self._ready.set_exception(error)
        while self._answers:
            self._answers.popleft().set_exception(error)

    def _why_closed(self) -> str:
        try:
            last = self.log.read_text(errors="replace").strip().splitlines()[-1:]
        except OSError:
            last = []
        return (f"The fork server for {', '.join(self.preload)} exited"
                + (f": {last[0].strip()}" if last else "") + ".")

    def close(self) -> None:
        """End the server (its children keep running: they belong to their clusters)."""
        if self.popen.poll() is None:
            self.stdin.close()
            try:
                self.popen.wait(2)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


async def get(python: str, preload: tuple[str, ...], env: dict[str, str], log: Path) -> ForkServer:
    """The fork server for ``python`` and ``preload``, started if there is none yet."""
    key = (python, preload)
    server = _servers.get(key)
    if server is None or server.closed or server.popen.poll() is not None:
        server = _servers[key] = ForkServer(python, preload, env, log)
    await server.wait_ready()
    return server


def ready(python: str, preload: tuple[str, ...]) -> ForkServer | None:
    """The fork server for ``python`` and ``preload`` if one is ready to fork now."""
    server = _servers.get((python, preload))
    if server is None or server.closed or not server._ready.done():
        return None
    return None if server._ready.exception() else server


def close_all() -> None:
    """End every fork server of this process (each ends with it anyway)."""
    for server in list(_servers.values()):
        server.close()
    _servers.clear()

"""What backends with engines on other machines share: the client's address as those
machines reach it, the files an engine reads (which the controller writes as it starts),
the command line that starts an engine under a lease there, and the lease server."""

from __future__ import annotations

import asyncio
import io
import os
import shlex
import socket
import tarfile
import time
from pathlib import Path

from ..errors import ConfigError, StartError
from .base import Command, Launched
from .local import SINGLE_THREADED, process_title

#: How long an engine's launch waits for the files it reads (the controller writes them).
FILE_WAIT = 60.0


def address_towards(address: str, port: int, what: str, fix: str) -> str:
    """This machine's address on the route to ``address`` (no packet is sent); ``what``
    and ``fix`` name the peer and the remedy if it cannot be found."""
    try:
        found = str(socket.getaddrinfo(address, port, type=socket.SOCK_DGRAM)[0][4][0])
        with socket.socket(socket.AF_INET6 if ":" in found else socket.AF_INET,
                           socket.SOCK_DGRAM) as s:
            s.connect((found, port))
            return s.getsockname()[0]
    except OSError as e:
        raise ConfigError(f"{what} cannot be found ({e}): {fix}") from None


async def wait_for_files(files: tuple[Path, ...], controller: Launched | None) -> None:
    """Until ``files`` exist here; a controller that exits first, or FILE_WAIT, ends the wait
    with a StartError saying so."""
    deadline = time.monotonic() + FILE_WAIT
    while not all(Path(f).exists() for f in files):
        if controller is not None and not controller.alive():
            raise StartError(f"The controller exited before it was ready (exit code "
                             f"{controller.exit_code()}; last output: "
                             f"{controller.log_tail(5).strip()[-400:]}).")
        if time.monotonic() > deadline:
            missing = [str(f) for f in files if not Path(f).exists()]
            raise StartError(f"{', '.join(missing)} did not appear within {FILE_WAIT:g} s: "
                             f"the controller did not start.")
        await asyncio.sleep(0.05)


def files_archive(files: tuple[Path, ...]) -> bytes:
    """``files`` as a tar archive that extracts with ``tar -x -C /`` to the same paths."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for path in files:
            tar.add(str(path), arcname=str(Path(path).resolve()).lstrip("/"))
    return buffer.getvalue()


def extract_archive(archive: bytes, expected: list[str]) -> None:
    """Write the files of a tar archive (only those ``expected``) here, 0600: what
    :func:`files_archive` made on another machine."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            path = "/" + member.name.lstrip("/")
            if path in expected and member.isfile():
                extracted = tar.extractfile(member)
                assert extracted is not None  # a regular file
                data = extracted.read()
                Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                fd = os.open(path + ".part", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with open(fd, "wb") as out:
                    out.write(data)
                os.replace(path + ".part", path)


def parent_folders(files: tuple[Path, ...]) -> list[str]:
    return sorted({str(Path(p).resolve().parent) for p in files})


def place_files_command(files: tuple[Path, ...]) -> str:
    """The shell command that writes ``files`` (a :func:`files_archive` on its input) at
    their paths on another machine, each replaced whole by a rename. Machines that share a
    folder (an NFS home, a shared /tmp) may be written to at once: tar's own unlink and
    create would then fail ("File exists"), and an engine could read a half-written file."""
    paths = [str(Path(p).resolve()) for p in files]
    folders = " ".join(map(shlex.quote, parent_folders(files)))
    moves = " && ".join(f'mv -f "$t"{shlex.quote(p)} {shlex.quote(p)}' for p in paths)
    first = shlex.quote(parent_folders(files)[0])
    return (f"umask 077 && mkdir -p {folders} && t=$(mktemp -d {first}/.incoming-XXXXXX) && "
            f"{{ tar -x -C \"$t\" -f - && {moves}; ok=$?; rm -rf \"$t\"; exit $ok; }}")


def check_lease(lease: float) -> None:
    if lease <= 0:
        raise ConfigError(f"lease must be a number of seconds above 0, not {lease}.")


def agent_command(python: str, cluster: str, command: Command, lease: float,
                  lease_from: str | None = None, env: dict[str, str] | None = None) -> str:
    """The shell command that runs ``command`` on another machine under cloudlab's agent,
    holding a lease on this client: heartbeats on its input, or from ``lease_from``.

    No path of the client's goes with it: the user's own modules reach the engines as
    code (:mod:`cloudlab.usercode`), wherever they run.
    """
    return shlex.join(agent_argv(python, cluster, command, lease, lease_from, env))


def agent_argv(python: str, cluster: str, command: Command, lease: float,
               lease_from: str | None = None, env: dict[str, str] | None = None) -> list[str]:
    """:func:`agent_command` as a list of words (``env K=V ... python -m cloudlab.onhost.agent``)."""
    env = {**SINGLE_THREADED, "PYTHONUNBUFFERED": "1", "CLOUDLAB_CLUSTER": cluster,
           **(env or {}), **command.env}
    return ["env", *(f"{k}={v}" for k, v in env.items()), python, "-m", "cloudlab.onhost.agent",
            "--lease", str(lease), *(("--lease-from", lease_from) if lease_from else ()),
            "--title", process_title(cluster, command.name), command.entry, "--",
            *command.args]


def mpirun_argv(ranks: list[tuple[list[str], str, Command]], cluster: str, lease: float,
                lease_from: str, options: list[str], as_root: bool) -> list[str]:
    """An mpirun command line whose rank ``i`` runs ``ranks[i]``'s command under cloudlab's
    agent: (where it goes, as mpirun options; the Python there; the command), one app
    context each. ``options`` go to mpirun itself; ``as_root``: mpirun runs as root."""
    argv = ["mpirun", "--bind-to", "none", *options,
            *(["--allow-run-as-root"] if as_root else [])]
    for rank, (where, python, command) in enumerate(ranks):
        argv += [":"] if rank else []  # the next app context
        argv += ["-n", "1", *where, *agent_argv(python, cluster, command, lease, lease_from)]
    return argv


class LeaseServer:
    """Heartbeats for engines that connect to the client (``agent --lease-from``).

    A thread accepts connections on ``address`` and writes a newline to each every
    ``period`` seconds. Engines end themselves when the heartbeats stop for a lease (a
    cut link) or the connection closes: when :meth:`close` is called, or when this process
    dies, kill -9 included, since the kernel then closes its sockets.
    """

    def __init__(self, address: str, period: float):
        import threading

        self.period = period
        self._listener = socket.create_server((address, 0), backlog=128)
        self._listener.settimeout(0)
        self.address = f"{address}:{self._listener.getsockname()[1]}"
        self._connections: list[socket.socket] = []
        self._closing = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="cloudlab-lease-server",
                                        daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        import select

        next_beat = time.monotonic()
        while not self._closing.is_set():
            ready, _, _ = select.select([self._listener], [], [],
                                        max(0.0, next_beat - time.monotonic()))
            if ready:
                try:
                    connection, _ = self._listener.accept()
                    connection.setblocking(False)
                    self._connections.append(connection)
                except OSError:
                    pass
            if time.monotonic() >= next_beat:
                next_beat = time.monotonic() + self.period
                for connection in list(self._connections):
                    try:
                        connection.send(b"\n")
                    except BlockingIOError:
                        pass  # its buffer is full of heartbeats already: it is alive
                    except OSError:
                        self._connections.remove(connection)
                        connection.close()

    def close(self) -> None:
        self._closing.set()
        self._thread.join(5)
        for connection in self._connections:
            connection.close()
        self._listener.close()

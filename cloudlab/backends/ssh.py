"""SSH backend: the controller here, engines on other machines reached over SSH.

The controller (ipcontroller or the Dask scheduler) runs on the client, as with the local
backend, but listens on the address the hosts reach this machine at; traffic to and from the
engines is authenticated and encrypted (CurveZMQ for ipyparallel, TLS for Dask: the engines
know they are remote). Engines are placed on the profile's hosts in turn. Each starts as::

    ssh HOST 'env ... PYTHON -m cloudlab.onhost.agent --lease L ENTRY -- ARGS'

after the files it reads (connection file, certificates) are copied to the same paths there.
Every host is probed first, and given the environment its engines run in: this client's
cloudlab and versions (:mod:`.environment`); a host that cannot be reached, refuses the key,
has an unknown host key, lacks Python or cannot install the packages is named before any
engine starts.

Engines hold a lease on this client: ``ssh`` keeps each engine's standard input open, and
the backend writes a heartbeat to it every quarter of ``lease``. When this client dies, ssh
closes the input and the engine ends at once; when the link stays cut longer than the lease,
the heartbeats stop arriving and the engine ends itself (:mod:`cloudlab.onhost.agent`).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, StartError
from ..profiles import option
from . import ssh_mpi, ssh_tunnels
from .base import Backend, Command, Launched, ServicePlace, read_tail
from .environment import EnvironmentOptions, HostInfo, check_options, ssh_runner
from .environment import prepare as prepare_host
from .local import LocalBackend, LocalOptions, process_title
from .remote import (
    FILE_WAIT,
    LeaseServer,
    address_towards,
    agent_command,
    check_lease,
    extract_archive,
    files_archive,
    place_files_command,
    wait_for_files,
)
from .ssh_hosts import CONNECT_TIMEOUT, SshHost, ssh_command


@dataclass(frozen=True)
class SshOptions(EnvironmentOptions):
    hosts: tuple[str, ...] = option((), "Hosts to start engines on, in turn: "
                                    "[user@]address[:port].")
    client_address: str = option("", "Address the hosts reach this machine at (default: the "
                                 "one this machine uses towards the first host).")
    identity_file: str = option("", "SSH private key (default: your agent's or ~/.ssh's).")
    known_hosts: str = option("", "known_hosts file (default: ssh's own).")
    lease: float = option(10.0, "Seconds an engine lives on without hearing from this "
                          "client (a cut link) before it ends itself.")
    controller_host: str = option("", "Run the controller on this host ([user@]address"
                                  "[:port]) rather than here: where the hosts cannot reach "
                                  "this machine, but it can reach them.")
    tunnel: bool = option(False, "With controller_host: reach the controller through SSH "
                          "tunnels to that host (only its SSH port need be open to you).")
    controller_address: str = option("", "With controller_host: the address the controller "
                                     "listens on and the hosts reach it at, where that is not "
                                     "the one you reach it at (a cloud VM's private address).")
    mpi_args: tuple[str, ...] = option((), "More mpirun options for --mpi across the hosts, "
                                       "e.g. [\"--mca\", \"btl_tcp_if_include\", "
                                       "\"10.0.0.0/24\"].")


class SshProcess(Launched):
    """An engine on another host, held by the ssh process that started it."""

    def __init__(self, name: str, host: SshHost, popen: subprocess.Popen, log: Path):
        self.name, self.host, self.pid = name, host.address, None
        self.popen, self.log = popen, log
        #: Why its machine went away, where a backend can tell (a cloud VM's end).
        self.machine_gone: Callable[[], str | None] = lambda: None

    def exit_code(self) -> int | None:
        return self.popen.poll()

    def last_words(self) -> str | None:
        return self.machine_gone()

    def log_tail(self, lines: int = 20) -> str:
        return read_tail(self.log, lines)


class SshBackend(Backend):
    name = "ssh"
    Options = SshOptions

    def __init__(self, options: SshOptions, cluster_name: str):
        super().__init__(options, cluster_name)
        if not options.hosts:
            raise ConfigError("The ssh backend needs hosts: hosts = [\"alice@lab-pc-1\", ...] "
                              "in the profile's [ssh] table, or hosts=[...] as a keyword.")
        try:
            self.hosts = [SshHost.parse(h) for h in options.hosts]
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check_lease(options.lease)
        check_options(options)
        try:
            self.controller_host = (SshHost.parse(options.controller_host)
                                    if options.controller_host else None)
        except ValueError as e:
            raise ConfigError(f"controller_host: {e}") from None
        if self.controller_host is not None:
            # Engines reach the controller there.
            self._address = options.controller_address or self.controller_host.address
        else:
            self._address = options.client_address or address_towards(
                self.hosts[0].address, self.hosts[0].port, f"Host {self.hosts[0]}",
                "check its address, or give client_address in the profile's [ssh] table.")
        self._local = LocalBackend(LocalOptions(ip=self._address), cluster_name)
        self._engines: list[SshProcess] = []
        self._heartbeat: threading.Thread | None = None
        self._closing = threading.Event()
        #: What each host offers, and its engines' Python, once prepared (a task: the
        #: controller's launch on a host waits for it too).
        self._preparing: asyncio.Future[dict[SshHost, HostInfo]] | None = None
        self._copied_to: set[SshHost] = set()  # hosts holding a copy of the cluster's files
        self._sent: dict[SshHost, dict[Path, int]] = {}  # file -> its time, as copied there
        self._copying: dict[SshHost, asyncio.Lock] = {}
        self._fetching: asyncio.Future | None = None  # the controller's files, coming back
        self._tunnels: list[subprocess.Popen] = []  # ssh -L to the controller's host
        self._assigned: dict[str, SshHost] = {}  # engine name -> the host it was put on
        self._controller: Launched | None = None
        self._lease: LeaseServer | None = None  # what its ranks hold a lease on
        self._mpi = False
        #: Where mpirun runs for --mpi: here (None), or a host (the hosts cannot reach here).
        self.mpi_launcher: SshHost | None = None
        self._forwards = contextlib.ExitStack()  # the ranks' leases, through SSH

    @property
    def controller_ip(self) -> str:
        return self._address

    def service_place(self) -> ServicePlace:
        if self.controller_host is None:
            return ServicePlace(self._address)
        # With the controller on a host of its own, the hosts may have no route to the client.
        return ServicePlace(None, tunnel=self.reverse_tunnel)

    def reverse_tunnel(self, port: int):
        """This client's 127.0.0.1:``port`` on every engine host's loopback (a context
        manager yielding the port there; :mod:`.ssh_tunnels`)."""
        return ssh_tunnels.reverse(list(self.hosts), port, self.options.identity_file,
                                   self.options.known_hosts)

    def max_engines(self, mb_per_engine: int) -> tuple[int, str]:
        return 64 * len(self.hosts), f"64 engines per host on {len(self.hosts)} hosts"

    async def prepare(self, preload: tuple[str, ...]) -> None:
        if self.controller_host is None:
            self._local.workdir = self.workdir
            await self._local.prepare(preload)
        await self.host_info()

    async def host_info(self) -> dict[SshHost, HostInfo]:
        """Every host probed and its environment ready (once; at once for all hosts)."""
        if self._preparing is None:
            hosts = list(dict.fromkeys([*self.hosts, *filter(None, [self.controller_host])]))
            options = self.options if not self._mpi else dataclasses.replace(
                self.options, host_packages=(*self.options.host_packages, "mpi4py"))

            async def every_host() -> dict[SshHost, HostInfo]:
                found = await asyncio.gather(*(asyncio.to_thread(
                    prepare_host, str(h), options, ssh_runner(
                        h, self.options.identity_file, self.options.known_hosts))
                    for h in hosts))
                return dict(zip(hosts, found))

            self._preparing = asyncio.ensure_future(every_host())
        return await asyncio.shield(self._preparing)

    async def gpus(self) -> tuple[list, str]:
        info = await self.host_info()
        found = [g for host in self.hosts for g in info[host].gpus]
        return found, "" if found else (f"no host offers one (nvidia-smi lists none on "
                                         f"{', '.join(map(str, self.hosts))})")

    async def _python_on(self, host: SshHost) -> str:
        info = await self.host_info()
        if host not in info:  # (a host added since: a VM for a replacement)
            self._preparing = None
            info = await self.host_info()
        return info[host].python

    async def launch(self, command: Command, cleanup: tuple[Path, ...] = ()) -> Launched:
        if command.controller and self.controller_host is None:
            self._local.workdir = self.workdir
            self._controller = await self._local.launch(command, cleanup)
            return self._controller
        if command.controller:
            # The cluster's folder as it is now (certificates, the folders the controller
            # writes into), then the controller, then its connection files back here.
            host = self.controller_host
            assert host is not None and self.workdir is not None  # (no controller_host: above)
            self._copied_to.add(host)
            await asyncio.to_thread(self._send_files, host, _tree(self.workdir))
        else:
            host = self._assigned[command.name] = (  # (before any await)
                self._host_named(command.host) if command.host else self._least_loaded())
            await self._copy_files(host, command.files)
        process = self._start(host, command, await self._python_on(host))
        if command.controller:
            self._controller = process
            self._fetching = asyncio.ensure_future(self._fetch_files(host, command.writes))
        return process

    def check_mpi(self) -> None:
        ssh_mpi.check(self.hosts, mpirun_here=self.mpi_launcher is None)
        self._mpi = True

    async def launch_world(self, commands: list[Command]) -> list[Launched]:
        """The engines as the ranks of one MPI job, placed on the hosts in turn."""
        info = await self.host_info()
        placed = [self.hosts[i % len(self.hosts)] for i in range(len(commands))]
        for host, command in zip(placed, commands):
            await self._copy_files(host, command.files)
        launcher = self.mpi_launcher
        extra: dict[str, Any] = {}
        if launcher is None:
            if self._lease is None:
                self._lease = LeaseServer(self._address, self.options.lease / 4)
            lease_from = self._lease.address
            identity, known_hosts = self.options.identity_file, self.options.known_hosts
        else:  # mpirun on a host: the cluster's key there, the leases through SSH
            key = Path(self.options.identity_file)
            await self._copy_files(launcher, (key,))
            identity, known_hosts = str(key), str(key.with_name("mpi_known_hosts"))
            extra = {"host_keys": "accept-new", "as_root": launcher.user == "root"}
            if self._lease is None:
                self._lease = LeaseServer("127.0.0.1", self.options.lease / 4)
            port = int(self._lease.address.rsplit(":", 1)[1])
            there = await asyncio.to_thread(self._forwards.enter_context, ssh_tunnels.reverse(
                list(dict.fromkeys(placed)), port, self.options.identity_file,
                self.options.known_hosts))
            lease_from = f"127.0.0.1:{there}"
        argv = ssh_mpi.mpirun_argv(
            [(h, info[h].python) for h in placed], commands, self.cluster_name,
            self.options.lease, lease_from, identity, known_hosts,
            tuple(self.options.mpi_args), **extra)
        if launcher is not None:
            argv = ssh_command(launcher, ssh_mpi.from_a_host(argv), self.options.identity_file,
                               self.options.known_hosts)
        assert self.workdir is not None  # the cluster sets it when it starts
        log = self.workdir / "mpi-world.log"
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            world = subprocess.Popen(argv, stdin=subprocess.DEVNULL if launcher is None else subprocess.PIPE,
                                     stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        return [ssh_mpi.RemoteRank(c.name, h, world, log) for c, h in zip(commands, placed)]

    def load(self) -> dict[SshHost, int]:
        """Engines on each host now, those still starting included."""
        load = {h: 0 for h in self.hosts}
        running = {p.name: p for p in self._engines}
        for name, host in self._assigned.items():
            process = running.get(name)  # (None: still starting)
            if host in load and (process is None or process.popen.poll() is None):
                load[host] += 1
        return load

    def _host_named(self, name: str) -> SshHost:
        for host in self.hosts:
            if str(host) == name:
                return host
        raise StartError(f"No host {name} in this cluster any more (its VM went away?).")

    def _least_loaded(self) -> SshHost:
        """The host running the fewest engines now (the first of those, in the given order)."""
        load = self.load()
        return min(self.hosts, key=lambda h: load[h])

    def _start(self, host: SshHost, command: Command, python: str) -> SshProcess:
        """``command`` on ``host`` under the agent, its lease held through ssh's input."""
        assert self.workdir is not None  # the cluster sets it when it starts
        log = self.workdir / f"{command.name}.log"
        remote = agent_command(python, self.cluster_name, command, self.options.lease)
        argv = ssh_command(host, remote, self.options.identity_file, self.options.known_hosts)
        with open(os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600), "ab") as out:
            popen = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        process = SshProcess(command.name, host, popen, log)
        self._engines.append(process)
        self._start_heartbeat()
        return process

    async def _fetch_files(self, host: SshHost, files: tuple[Path, ...]) -> None:
        """Bring the files the controller writes on ``host`` to the same paths here, once
        they are all there (the engines and the client wait for them)."""
        if not files:
            return
        paths = [str(Path(f).resolve()) for f in files]
        check = " && ".join(f"test -s {shlex.quote(p)}" for p in paths)
        remote = f"{check} && tar -c -C / -f - {' '.join(shlex.quote(p.lstrip('/')) for p in paths)}"
        argv = ssh_command(host, remote, self.options.identity_file, self.options.known_hosts)
        deadline = time.monotonic() + FILE_WAIT
        assert self._controller is not None  # set before this starts
        while time.monotonic() < deadline and self._controller.alive():
            done = await asyncio.to_thread(subprocess.run, argv, capture_output=True,
                                           timeout=30, stdin=subprocess.DEVNULL)
            if done.returncode == 0:
                extract_archive(done.stdout, paths)
                return
            await asyncio.sleep(0.1)

    async def _copy_files(self, host: SshHost, files: tuple[Path, ...]) -> None:
        """Wait for ``files`` here, then write them at the same paths on ``host`` (0600, in
        folders only its user can enter)."""
        await wait_for_files(files, self._controller)
        # One copy at a time to a host, and only of what it lacks: engines started together
        # read the same files (two tars writing one file at once fail).
        async with self._copying.setdefault(host, asyncio.Lock()):
            sent = self._sent.setdefault(host, {})
            stamps = {f: Path(f).stat().st_mtime_ns for f in files}
            new = tuple(f for f in files if sent.get(f) != stamps[f])
            if new:
                self._copied_to.add(host)
                await asyncio.to_thread(self._send_files, host, new)
                sent.update({f: stamps[f] for f in new})

    def _send_files(self, host: SshHost, files: tuple[Path, ...]) -> None:
        done = subprocess.run(
            ssh_command(host, place_files_command(files), self.options.identity_file,
                        self.options.known_hosts),
            input=files_archive(files), capture_output=True, timeout=60)
        if done.returncode != 0:
            raise StartError(f"Could not copy the connection files to {host}: "
                             f"{done.stderr.decode(errors='replace').strip()[-300:]}")

    def _start_heartbeat(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, name="cloudlab-ssh-lease",
                                               daemon=True)
            self._heartbeat.start()

    def _beat(self) -> None:
        """A newline to every engine's ssh every quarter lease: the engines' lease on us."""
        while not self._closing.wait(self.options.lease / 4):
            for process in list(self._engines):
                if process.popen.poll() is None:
                    assert process.popen.stdin is not None  # a pipe: see _start
                    try:
                        process.popen.stdin.write(b"\n")
                        process.popen.stdin.flush()
                    except (BrokenPipeError, ValueError, OSError):
                        pass

    async def terminate(self, launched: list[Launched], grace: float = 1.0) -> None:
        worlds = list({id(p.world): p.world for p in launched
                       if isinstance(p, ssh_mpi.RemoteRank)}.values())
        for world in worlds:  # mpirun ends its ranks on every host
            if world.stdin is not None:  # (mpirun on a host: its session's input ends it)
                world.stdin.close()
            world.terminate()
        launched = [p for p in launched if not isinstance(p, ssh_mpi.RemoteRank)]
        local = [p for p in launched if not isinstance(p, SshProcess)]
        remote = [p for p in launched if isinstance(p, SshProcess)]
        for process in remote:  # a closed input ends the engine's whole group there at once
            assert process.popen.stdin is not None  # a pipe: see _start
            try:
                process.popen.stdin.close()
            except OSError:
                pass
        await self._until_ended(remote, max(grace, 1.0))
        stuck = [p for p in remote if p.popen.poll() is None]
        if stuck:  # stopped there (SIGSTOP, a frozen VM): it cannot read its input's end
            await asyncio.gather(*(asyncio.to_thread(self._kill_there, p) for p in stuck))
            await self._until_ended(stuck, 5.0)
        for process in remote:
            if process.popen.poll() is None:
                process.popen.kill()
                process.popen.wait()
            if process in self._engines:
                self._engines.remove(process)
            self._assigned.pop(process.name, None)
        for world in worlds:
            try:
                await asyncio.to_thread(world.wait, max(grace, 5.0))
            except subprocess.TimeoutExpired:
                world.kill()
                world.wait()
        if local:
            await self._local.terminate(local, grace)

    @staticmethod
    async def _until_ended(processes: list[SshProcess], seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while any(p.popen.poll() is None for p in processes) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def _kill_there(self, process: SshProcess) -> None:
        """SIGKILL ``process`` and its process group on its host, found by its title (a
        host that cannot be reached: its lease ends it, once it runs again)."""
        host = self._assigned.get(process.name)
        if host is None:
            return
        title = process_title(self.cluster_name, process.name)
        # (Its title, or the agent's command line naming it, before the title is set.)
        pattern = shlex.quote(f"(^|--title ){re.escape(title)}( |$)")
        remote = (f"for pid in $(pgrep -f {pattern}); do "
                  f'kill -KILL -- "-$(ps -o pgid= -p "$pid" | tr -d " ")" "$pid"; '
                  f"done 2>/dev/null; true")
        with contextlib.suppress(subprocess.TimeoutExpired, OSError):
            subprocess.run(ssh_command(host, remote, self.options.identity_file,
                                       self.options.known_hosts),
                           capture_output=True, timeout=CONNECT_TIMEOUT + 10,
                           stdin=subprocess.DEVNULL)

    async def reach(self, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
        if not (self.options.tunnel and self.controller_host is not None):
            return addresses
        return await asyncio.to_thread(self._open_tunnel, addresses)

    def _open_tunnel(self, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """One ssh to the controller's host forwarding a local port to each address; the
        local ends, once they accept connections."""
        import socket

        local = []
        for _ in addresses:  # free ports here (bound, then released for ssh to take)
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                local.append(s.getsockname()[1])
        forwards = [a for (host, port), here in zip(addresses, local)
                    for a in ("-L", f"127.0.0.1:{here}:{host}:{port}")]
        # The session reads its input until it closes: when this client dies, kill -9
        # included, the tunnel ends with it (as engines' leases do).
        assert self.controller_host is not None  # (see reach)
        argv = ssh_command(self.controller_host, "cat > /dev/null", self.options.identity_file,
                           self.options.known_hosts)
        argv = [argv[0], "-o", "ExitOnForwardFailure=yes", *forwards, *argv[1:]]
        tunnel = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, start_new_session=True)
        assert tunnel.stderr is not None  # a pipe
        self._tunnels.append(tunnel)
        deadline = time.monotonic() + 30
        for here in local:
            while True:
                try:
                    socket.create_connection(("127.0.0.1", here), timeout=1).close()
                    break
                except OSError:
                    if tunnel.poll() is not None or time.monotonic() > deadline:
                        tunnel.kill()
                        raise StartError(f"Could not open an SSH tunnel to the controller on "
                                         f"{self.controller_host}: "
                                         f"{tunnel.stderr.read().decode(errors='replace')[-300:]}"
                                         ) from None
                    time.sleep(0.05)
        return [("127.0.0.1", here) for here in local]

    async def close(self) -> None:
        self._closing.set()
        await asyncio.to_thread(self._forwards.close)
        if self._lease is not None:
            self._lease.close()
        for tunnel in self._tunnels:
            assert tunnel.stdin is not None  # a pipe: see _open_tunnel
            tunnel.stdin.close()
            tunnel.kill()
            tunnel.wait()
        if self._fetching is not None and not self._fetching.done():
            self._fetching.cancel()
        if self._copied_to and self.workdir is not None:
            # The copies of the cluster's files (keys among them) go with it: its folder is
            # its own, so removing it is safe where the host shares the client's filesystem.
            await asyncio.gather(*(asyncio.to_thread(self._remove_copies, h)
                                   for h in self._copied_to))
            self._copied_to.clear()
            self._sent.clear()

    def _remove_copies(self, host: SshHost) -> None:
        assert self.workdir is not None  # (see close)
        remote = f"rm -rf -- {shlex.quote(str(self.workdir.resolve()))}"
        try:
            subprocess.run(ssh_command(host, remote, self.options.identity_file,
                                       self.options.known_hosts),
                           capture_output=True, timeout=15, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            pass  # an unreachable host keeps its copy, in its user's 0700 runtime folder


def _tree(folder: Path) -> tuple[Path, ...]:
    """Every file under ``folder``, and every folder without files (kept as folders)."""
    return tuple(p for p in sorted(folder.rglob("*"))
                 if p.is_file() or (p.is_dir() and not any(p.iterdir()))) or (folder,)

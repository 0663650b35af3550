"""Test hosts: network namespaces on a bridge, each running a real sshd.

Several machines on one: each host is a network namespace joined to a bridge on the client
by a veth pair, with an address of its own in a private /24 (the client is .1 on the
bridge), and Debian's sshd listening on that address. Names carry this process's id, so
parallel runs cannot collide. Everything is torn down on exit, also when a test fails
(TESTING.md, "Several hosts").

A host shares nothing with the client that a real machine would not: its sshd runs in a
mount namespace of its own with the client's checkout (its venv and the tests' folder with
it) and pip's machine-wide configuration hidden under empty tmpfs, and a home folder of its
own over root's (which holds the client's Python, pyenv's, and its caches). Its Python is
Debian's /usr/bin/python3, with nothing installed. The home folders outlive the network,
as a machine's disk does: hosts of the same index in later networks of the test run find
what earlier ones installed there (``homes``).

    with HostNetwork(2) as net:
        net.hosts[0].ssh("python3 -V")
        net.cut(net.hosts[1])       # the link down, as a pulled cable
"""

from __future__ import annotations

import itertools
import os
import shlex
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SSH_PORT = 2222
_networks = itertools.count()
#: What a real host would not have: the client's checkout (its venv, the tests' folder)
#: and this machine's pip configuration (a wheel folder, constraints).
CHECKOUT = Path(__file__).resolve().parent.parent
HIDDEN = (CHECKOUT, Path("/etc/xdg/pip"))


def missing() -> str | None:
    """Why test hosts cannot be built here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool, package in (("ip", "iproute2"), ("nsenter", "util-linux"),
                          ("/usr/sbin/sshd", "openssh-server"), ("ssh", "openssh-client"),
                          ("ssh-keygen", "openssh-client")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package {package})"
    return None


@dataclass
class TestHost:
    name: str  # the network namespace
    address: str
    veth: str  # the client's end of its link
    folder: Path
    network: HostNetwork
    #: Folders this host does not share with the client (empty: it shares everything).
    private: tuple[Path, ...] = ()
    port: int = SSH_PORT  # sshd's
    #: A public key sshd also accepts (a cloud's key pair), beside the network's user key.
    authorized_key: str | None = None
    #: A second address sshd answers at (a cloud VM's public address; in a cloud it is
    #: translated to the private one, which is all the VM's own programs see and use).
    public_address: str | None = None

    @property
    def sshd_pid(self) -> int:
        return int((self.folder / "sshd.pid").read_text())

    def ssh_command(self, *command: str) -> list[str]:
        return ["ssh", "-i", str(self.network.user_key), "-p", str(self.port),
                "-o", f"UserKnownHostsFile={self.network.known_hosts}",
                "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes",
                "-o", "ConnectTimeout=5", f"root@{self.address}", *command]

    def ssh(self, command: str, timeout: float = 20) -> subprocess.CompletedProcess:
        return subprocess.run(self.ssh_command(command), capture_output=True, text=True,
                              timeout=timeout)

    def inside(self, *command: str) -> list[str]:
        """``command`` run in this host's network (nsenter, which keeps /sys as it is)."""
        return ["nsenter", f"--net=/run/netns/{self.name}", *command]


class Started:
    """A context manager over ``_start`` and ``close``: a failed start closes what it began."""

    def __enter__(self):
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class HostNetwork(Started):
    """``count`` hosts on a bridge, each with sshd on port 2222; a context manager."""

    def __init__(self, count: int, folder: Path, private: dict[int, Path] | None = None,
                 homes: Path | None = None, shared_home: bool = False,
                 gpus: dict[int, list[str]] | None = None):
        """``private``: host index -> a folder that host has its own empty copy of;
        ``homes``: where each host's home folder is kept (default: inside ``folder``);
        ``shared_home``: one home folder for every host (test VMs: as if their image were
        made after the first had installed cloudlab's environment); ``gpus``: host index ->
        the names of the GPUs it has (a stand-in nvidia-smi lists them: no GPU is here)."""
        # Unique per process and per network in it (interface names: 15 characters at most).
        tag = (os.getpid() % 10_000) * 10 + next(_networks) % 10
        self.bridge = f"clbr{tag}"
        self.subnet = f"10.77.{20 + tag % 200}"
        self.client_address = f"{self.subnet}.1"
        self.folder = folder
        self.user_key = folder / "user_key"
        self.known_hosts = folder / "known_hosts"
        self.tag = tag
        self.homes = homes or folder / "homes"
        self.shared_home = shared_home
        self.gpus = gpus or {}
        self._added = 0
        self.hosts = [self._host(f"{self.subnet}.{11 + i}", i, tuple(filter(None, [
            (private or {}).get(i)]))) for i in range(count)]

    def _host(self, address: str, i: int, private: tuple[Path, ...] = (), **more) -> TestHost:
        return TestHost(f"cl{self.tag}n{i}", address, f"clv{self.tag}n{i}",
                        self.folder / f"host{i}", self, private, **more)


    def _start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        _run("ip", "link", "add", self.bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{self.client_address}/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(self.user_key))
        Path("/run/sshd").mkdir(exist_ok=True)
        self.known_hosts.write_text("".join(self._bring_up(h) for h in self.hosts))
        for host in self.hosts:
            self._wait_for_ssh(host)

    def _bring_up(self, host: TestHost) -> str:
        """The host's namespace, link and sshd; its known_hosts line."""
        _run("ip", "netns", "add", host.name)
        _run("ip", "link", "add", host.veth, "type", "veth", "peer", "name", "eth0",
             "netns", host.name)
        _run("ip", "link", "set", host.veth, "master", self.bridge, "up")
        _run("ip", "-n", host.name, "addr", "add", f"{host.address}/24", "dev", "eth0")
        if host.public_address:
            _run("ip", "-n", host.name, "addr", "add", f"{host.public_address}/24", "dev", "eth0")
        _run("ip", "-n", host.name, "link", "set", "eth0", "up")
        _run("ip", "-n", host.name, "link", "set", "lo", "up")
        return self._start_sshd(host)

    def add_host(self, address: str, private: tuple[Path, ...] = (), port: int = SSH_PORT,
                 authorized_key: str | None = None, public_address: str | None = None
                 ) -> TestHost:
        """One more host, at ``address`` in this network's subnet (a VM a cloud started)."""
        self._added += 1  # (names are never reused: a removed host's folder stays)
        host = self._host(address, 100 + self._added, private, port=port,
                          authorized_key=authorized_key, public_address=public_address)
        self.hosts.append(host)
        with open(self.known_hosts, "a") as known:
            known.write(self._bring_up(host))
        self._wait_for_ssh(host)
        return host

    def remove_host(self, host: TestHost) -> None:
        """Everything running in the host, and the host itself, gone (a deleted VM)."""
        _kill_inside(host.name)
        subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
        subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
        self.hosts.remove(host)

    def _start_sshd(self, host: TestHost) -> str:
        d = host.folder
        d.mkdir(parents=True)
        _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "host_key"))
        authorized = d / "authorized_keys"
        authorized.write_text(Path(f"{self.user_key}.pub").read_text() +
                              (host.authorized_key.strip() + "\n" if host.authorized_key else ""))
        authorized.chmod(0o600)
        config = d / "sshd_config"
        config.write_text("\n".join([
            f"ListenAddress {host.address}:{host.port}",
            *([f"ListenAddress {host.public_address}:{host.port}"] if host.public_address else []),
            f"HostKey {d / 'host_key'}",
            f"AuthorizedKeysFile {authorized}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
            "StrictModes no", "UsePAM no", f"PidFile {d / 'sshd.pid'}",
            "AcceptEnv CLOUDLAB_*",
            # The hosts share /tmp and a hostname, so Open MPI's session folders
            # (/tmp/ompi.HOSTNAME.UID) would be one for all: one job's clean-up could remove
            # what another host's daemon is making. A folder of its own, as on a machine.
            f"SetEnv OMPI_MCA_orte_tmpdir_base={d / 'tmp'}", ""]))
        (d / "tmp").mkdir(mode=0o1777)
        # An absolute config path: sshd re-executes itself from / for each connection.
        sshd = ["/usr/sbin/sshd", "-f", str(config.resolve()), "-E", str(d / "log")]
        home = self.homes / ("shared" if self.shared_home
                             else host.name.replace(f"cl{self.tag}", "host"))
        index = int(host.name.rsplit("n", 1)[1])
        bins = _fake_nvidia_smi(d / "bin", self.gpus[index]) if index in self.gpus else None
        _run(*host.inside(*apart(f"exec {shlex.join(sshd)}", (*HIDDEN, *host.private), home,
                                 made=host.private, bins=bins)))
        public = (d / "host_key.pub").read_text().split()
        where = host.address if host.port == 22 else f"[{host.address}]:{host.port}"
        return f"{where} {public[0]} {public[1]}\n"

    def _wait_for_ssh(self, host: TestHost, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while True:
            done = host.ssh("true", timeout=10)
            if done.returncode == 0:
                return
            if time.monotonic() > deadline:
                log = (host.folder / "log").read_text() if (host.folder / "log").exists() else ""
                raise RuntimeError(f"sshd on {host.name} ({host.address}) did not answer: "
                                   f"{done.stderr.strip()} {log[-500:]}")
            time.sleep(0.1)

    def cut(self, host: TestHost) -> None:
        """Take the host's link down: packets to and from it are dropped, as with a pulled cable."""
        _run("ip", "link", "set", host.veth, "down")

    def restore(self, host: TestHost) -> None:
        _run("ip", "link", "set", host.veth, "up")

    def close(self) -> None:
        """Stop every sshd (and whatever else runs in the hosts), remove hosts and bridge."""
        for host in self.hosts:
            _kill_inside(host.name)
            subprocess.run(["ip", "netns", "del", host.name], capture_output=True)
            subprocess.run(["ip", "link", "del", host.veth], capture_output=True)
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)

    def cloudlab_processes(self) -> dict[str, list[int]]:
        """cloudlab's processes running in each host's network (not sshd or slurmd)."""
        import psutil

        found = {}
        for host in self.hosts:
            pids = subprocess.run(["ip", "netns", "pids", host.name], capture_output=True,
                                  text=True).stdout.split()
            found[host.name] = [int(p) for p in pids if _is_cloudlab(psutil, int(p))]
        return found

    def exists(self) -> bool:
        """Whether anything of this network is left (the tests check teardown)."""
        namespaces = subprocess.run(["ip", "netns", "list"], capture_output=True,
                                    text=True).stdout.split()
        links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        return any(h.name in namespaces for h in self.hosts) or f" {self.bridge}:" in links


def _kill_inside(namespace: str) -> None:
    """SIGKILL every process in network namespace ``namespace``."""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                          text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), 9)
        except (OSError, ValueError):
            pass


def apart(command: str, hidden: tuple[Path, ...], home: Path | None = None,
          made: tuple[Path, ...] = (), bins: Path | None = None) -> list[str]:
    """``command`` (a shell command) in a mount namespace of its own: an empty tmpfs over
    each of ``hidden`` (made first where in ``made``), ``home`` over root's home folder and
    ``bins`` over /usr/local/bin, if given. What it and its children write there stays
    theirs, as on another machine."""
    mounts = [f"mount --bind {shlex.quote(str(bins))} /usr/local/bin"] if bins else []
    if home is not None:
        home.mkdir(parents=True, exist_ok=True, mode=0o700)
        mounts.append(f"mount --bind {shlex.quote(str(home))} {shlex.quote(str(Path.home()))}")
    for folder in hidden:
        if folder in made:
            folder.mkdir(parents=True, exist_ok=True)
        if folder.exists():
            mounts.append(f"mount -t tmpfs -o mode=700 cloudlab-test {shlex.quote(str(folder))}")
    return ["unshare", "--mount", "--propagation", "private", "sh", "-c",
            " && ".join([*mounts, command])]


def _fake_nvidia_smi(folder: Path, names: list[str]) -> Path:
    """A folder holding an nvidia-smi that lists GPUs ``names`` as the real one does for
    ``--query-gpu=index,name,uuid,memory.total --format=csv,noheader,nounits``."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = "".join(f"{i}, {name}, GPU-{i:08d}-fake, 23028\n" for i, name in enumerate(names))
    script = folder / "nvidia-smi"
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{rows}EOF\n")
    script.chmod(0o755)
    return folder


def network_of(pid: int) -> str:
    """The network namespace process ``pid`` runs in (which host it is on)."""
    return os.readlink(f"/proc/{pid}/ns/net")


def _is_cloudlab(psutil, pid: int) -> bool:
    try:
        words = psutil.Process(pid).cmdline()
    except psutil.Error:
        return False
    return bool(words) and (words[0].startswith("cloudlab:") or "cloudlab.onhost.agent" in words)


def _run(*command: str) -> None:
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()}")


def reachable(address: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False

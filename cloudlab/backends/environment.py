"""The environment engines run in on a host that shares nothing with the client.

Each host is probed by its own Python (:mod:`cloudlab.onhost.hostenv`, standard library only),
through a *runner*: ssh to that host, or a Slurm job on a node. Unless the profile says the
host's Python is one the user keeps (``environment = "own"``), cloudlab keeps an
environment of its own there, one per client
cloudlab and pinned versions (the *key*), under ``env_dir``: a venv holding the engines'
packages at this client's versions and this client's cloudlab, from a wheel of the
installed copy (:mod:`cloudlab.wheels`). The packages come from the host's package index
(``packages = "index"``) or from this client (``"client"``: its installed packages made
back into wheels and sent over SSH); ``"auto"`` sends them where the host's Python can take
this client's builds (same version and machine), else uses the host's index. The name
``cloudlab`` is never looked up on any index.

With ``environment = "own"``, the host's Python is used as it is, and any package whose
version differs from this client's is named before anything starts.
"""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .. import wheels
from ..errors import ConfigError
from ..gpus import Gpu
from ..profiles import option
from .ssh_hosts import HostError, SshHost, ssh_command, ssh_failure

#: The script a host's Python runs: this module's sibling, sent as source.
SCRIPT = (Path(__file__).resolve().parent.parent / "onhost" / "hostenv.py").read_text()
#: Seconds one host has to install its environment (the first time only).
INSTALL_TIMEOUT = 900.0

#: Runs a shell command where the engines will run: ``run(command, stdin, timeout)``,
#: giving its exit status and output (bytes); raises HostError if it cannot get there.
Runner = Callable[[str, "bytes | None", float], subprocess.CompletedProcess]


@dataclass(frozen=True)
class EnvironmentOptions:
    """Where engines' packages come from on hosts that share nothing with the client."""

    python: str = option("python3", "Python on the hosts that cloudlab's environment is made "
                         "from (or, with environment = \"own\", that engines run).")
    environment: str = option("managed", "\"managed\": cloudlab keeps an environment on each "
                              "host with this client's cloudlab and versions; \"own\": use "
                              "python as it is (its versions must match this client's).",
                              choices=("managed", "own"))
    packages: str = option("auto", "Where a managed environment's packages come from: "
                           "\"index\" (the host's package index), \"client\" (sent from "
                           "here over SSH), \"auto\" (sent where the host's Python can use "
                           "this client's builds, else its index).",
                           choices=("auto", "index", "client"))
    index_url: str = option("", "Package index the hosts install from (default: their pip's "
                            "own configuration).")
    host_packages: tuple[str, ...] = option((), "More packages engines import (installed "
                                            "here): the hosts get this client's versions.")
    env_dir: str = option("~/.cache/cloudlab/envs", "Where on each host cloudlab keeps its "
                          "environments (a shared home installs once for all its hosts).")


@dataclass(frozen=True)
class HostInfo:
    """What a host offers, and the Python its engines run."""

    host: str  # where, as messages name it ("root@lab-pc-1", "Slurm's nodes")
    python: str  # the engines' (the managed environment's, or the user's own)
    python_version: str
    cores: int
    memory_mb: float
    gpus: tuple[Gpu, ...]
    markers: dict
    #: What was installed there for this start ("" where nothing was).
    installed: str = ""


def probe(host: str, options: EnvironmentOptions, run: Runner, timeout: float = 30) -> dict:
    """The host's facts (:func:`cloudlab.onhost.hostenv.probe`); HostError naming the fix if its
    Python cannot be run."""
    python = options.python
    remote = shlex.join([python, "-c", SCRIPT, "probe", options.env_dir, options.environment])
    done = run(remote, None, timeout)
    # The shell's own complaint only: a traceback that mentions a missing file is not this.
    if done.returncode == 127 or f"{python}: No such file or directory" in done.stderr.decode():
        raise HostError(f"Host {host} has no Python at {python}: install Python 3.11 there, or "
                        f"name the one it has with python = \"/path/to/python\" in the "
                        f"profile.")
    try:
        return json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        said = (done.stderr or done.stdout).decode(errors="replace").strip()[-300:]
        raise HostError(f"Host {host}: {python} did not run cloudlab's probe (exit status "
                        f"{done.returncode}: {said or 'no output'}).") from None


def prepare(host: str, options: EnvironmentOptions, run: Runner) -> HostInfo:
    """Probe ``host`` and make sure its engines' Python has this client's cloudlab and
    versions (installing them the first time); HostError with the fix otherwise."""
    facts = probe(host, options, run)
    major_minor = tuple(int(x) for x in facts["python_version"].split(".")[:2])
    if major_minor < (3, 11):
        raise HostError(f"Host {host} has Python {facts['python_version']} at "
                        f"{options.python}; cloudlab needs 3.11 or newer: install it there "
                        f"and name it with python = \"/path/to/python3.11\" in the profile.")
    markers = facts["markers"]
    pins = wheels.engine_pins(tuple(options.host_packages), markers)
    installed = ""
    if options.environment == "own":
        _check_versions(host, options.python, facts["versions"], pins)
        python = options.python
    else:
        own = wheels.own_wheel()
        key = environment_key(own, pins, markers)
        python = facts["environments"].get(key)
        if python is None:
            source = package_source(options.packages, markers)
            python = _install(host, options, run, key, own, pins, markers, source)
            installed = f"{key} ({len(pins.constraints)} packages from {source})"
    found = tuple(Gpu(g["index"], g["name"], g["uuid"], g["memory_mb"], host)
                  for g in facts["gpus"])
    return HostInfo(host, python, facts["python_version"], int(facts["cores"]),
                    float(facts["memory_mb"]), found, markers, installed)


def environment_key(own: Path, pins: wheels.Pins, markers: dict) -> str:
    """The environment's name: cloudlab's version and hash, the pins, the Python's version."""
    import hashlib

    digest = hashlib.sha256("\n".join([own.name, *pins.requirements, *pins.constraints,
                                       *pins.missing]).encode()).hexdigest()[:10]
    version = own.name.split("-")[1]
    return f"cloudlab-{version}-py{markers['python_full_version']}-{digest}"


def package_source(packages: str, markers: dict) -> str:
    """"client" or "index": ``auto`` sends this client's packages where the host's Python
    is this one's version on this one's machine (its binary wheels fit there)."""
    if packages != "auto":
        return packages
    return "client" if _their_tag(markers) == wheels.python_tag() else "index"


def _their_tag(markers: dict) -> str:
    return f"{markers['python_version']} {markers['platform_machine']} " \
           f"{markers['platform_system']}"


def _install(host: str, options: EnvironmentOptions, run: Runner, key: str, own: Path,
             pins: wheels.Pins, markers: dict, source: str) -> str:
    if source == "client":
        mine, theirs = wheels.python_tag(), _their_tag(markers)
        if mine != theirs:
            raise HostError(f"Host {host} runs Python {theirs} and this client {mine}, so this "
                            f"client's packages cannot be sent there: set packages = "
                            f"\"index\" in the profile (the host installs them from its "
                            f"package index), or name a Python {mine.split()[0]} there with "
                            f"python = \"...\".")
        sent = wheels.client_wheels(pins, markers)
    else:
        sent = []
    trusted = [urlsplit(options.index_url).hostname] \
        if options.index_url.startswith("http://") else []
    manifest = {"pins": list(pins.constraints), "requirements": list(pins.requirements)
                + list(pins.missing), "own": wheels.OWN, "source": source,
                "index_url": options.index_url, "trusted_hosts": trusted}
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w") as tar:
        data = json.dumps(manifest).encode()
        entry = tarfile.TarInfo("manifest.json")
        entry.size = len(data)
        tar.addfile(entry, io.BytesIO(data))
        for wheel in [own, *sent]:
            tar.add(str(wheel), arcname=f"wheels/{wheel.name}")
    remote = shlex.join([options.python, "-c", SCRIPT, "install", options.env_dir, key])
    done = run(remote, archive.getvalue(), INSTALL_TIMEOUT)
    if done.returncode != 0:
        said = done.stderr.decode(errors="replace").strip()
        lines = [line for line in said.splitlines() if line.startswith("ERROR")] or \
            said.splitlines()[-3:] or ["no output"]
        if "ensurepip" in said:
            raise HostError(f"Host {host}: {options.python} cannot make a virtual environment "
                            f"(no ensurepip): install python3-venv there (Debian, Ubuntu: "
                            f"apt-get install python3-venv), or name another Python with "
                            f"python = \"...\".")
        fix = ("check that it reaches its package index (or give index_url), or set packages "
               "= \"client\" to send them from here" if source == "index" else
               "see the log beside the environment there")
        raise HostError(f"Host {host}: installing the engines' packages into {options.env_dir}"
                        f"/{key} failed ({' '.join(lines)[-400:]}): {fix}.")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])["env_python"]


def _check_versions(host: str, python: str, versions: dict, pins: wheels.Pins) -> None:
    """The user's own environment: cloudlab there, and every pinned package at this
    client's version."""
    if "cloudlab" not in versions:
        raise HostError(f"Host {host} has no cloudlab in {python}, and it cannot come from a "
                        f"package index (there, cloudlab is another project): remove "
                        f"environment = \"own\" from the profile, so that cloudlab installs "
                        f"this client's copy in an environment of its own there.")
    differ = []
    for pin in pins.constraints:
        name, version = pin.split("==")
        theirs = versions.get(name)
        if theirs != version:
            differ.append((name, theirs or "none", version))
    if differ:
        name, theirs, mine = differ[0]
        more = f" (and {len(differ) - 1} more: {', '.join(d[0] for d in differ[1:4])}...)" \
            if len(differ) > 1 else ""
        raise HostError(f"Host {host} has {name} {theirs} in {python} and this client "
                        f"{mine}{more}: pip install {name}=={mine} there, or remove "
                        f"environment = \"own\" from the profile so that cloudlab keeps "
                        f"matching versions there itself.")


def ssh_runner(host: SshHost, identity_file: str = "", known_hosts: str = "") -> Runner:
    """Commands run on ``host`` over ssh; HostError for ssh's own failures and timeouts."""

    def run(remote: str, stdin: bytes | None, timeout: float) -> subprocess.CompletedProcess:
        try:
            done = subprocess.run(ssh_command(host, remote, identity_file, known_hosts),
                                  capture_output=True, timeout=timeout, input=stdin,
                                  stdin=None if stdin is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise HostError(f"Host {host} did not answer within {timeout:g} s: check that it "
                            f"is up and that sshd runs there.") from None
        if done.returncode == 255:
            raise HostError(ssh_failure(host, done.stderr.decode(errors="replace"),
                                        known_hosts))
        return done

    return run


def check_options(options: EnvironmentOptions) -> None:
    if options.index_url and not options.index_url.startswith(("http://", "https://")):
        raise ConfigError(f"index_url must be an http(s) address like "
                          f"https://pypi.org/simple/, not {options.index_url!r}.")

"""Wheels made from what is installed here, and the versions engines must share with it.

A host that shares nothing with the client gets exactly the client's cloudlab: a wheel
built from the installed copy (an editable checkout included), never a name looked up on
a package index (there, ``cloudlab`` is another project's name). The packages engines
import are pinned to the client's versions, since Dask refuses mismatched versions and
pickles break across them; where a host has no index to install them from, the client's
own installed packages are turned back into wheels and sent too.

Wheels are cached under ``~/.cache/cloudlab/wheels`` (``XDG_CACHE_HOME`` honoured): an
installed version's wheel by name, version and tag; cloudlab's by the hash of its files.
"""

from __future__ import annotations

import base64
import csv
import functools
import hashlib
import importlib.metadata as metadata
import io
import os
import re
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

#: The distribution whose wheel travels to every host.
OWN = "cloudlab"
#: cloudlab's dependencies that only the client uses (the notebook's side).
CLIENT_ONLY = frozenset({"jupyterlab", "ipywidgets", "matplotlib"})
#: Fixed in every wheel made here, so that the same files make the same bytes.
EPOCH = (1980, 1, 1, 0, 0, 0)
#: One wheel is built at a time in this process (hosts are prepared in threads).
_building = threading.RLock()
#: Files of an installed .dist-info that are the installer's, not the wheel's.
INSTALLER_FILES = {"RECORD", "INSTALLER", "REQUESTED", "direct_url.json"}


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    path = Path(base, "cloudlab", "wheels")
    path.mkdir(parents=True, exist_ok=True)
    return path


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pins:
    """What engines need: the packages asked for by name (``requirements``), every package
    they pull in at this client's version (``constraints``), and those a host's Python needs
    that this client does not have (``missing``: name -> the requirement, unpinned)."""

    requirements: tuple[str, ...]
    constraints: tuple[str, ...]
    missing: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [c.split("==")[0] for c in self.constraints]


def _installed() -> dict[str, metadata.Distribution]:
    found: dict[str, metadata.Distribution] = {}
    for dist in metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(canonical(name), dist)
    return found


def engine_pins(extra: tuple[str, ...] = (), markers: dict[str, str] | None = None) -> Pins:
    """cloudlab's dependencies that engines import (and ``extra``, more packages the user's
    engines need), each with everything it needs, at the versions installed here; what is
    needed is judged by the host's environment ``markers`` (default: this one's).

    Worked out once per set of markers (every host of a cluster asks) until a package is
    installed or removed here (a site-packages folder changes)."""
    return _engine_pins(tuple(extra), tuple(sorted((markers or {}).items())), _site_stamp())


def _site_stamp() -> tuple[int, ...]:
    """What changes when a distribution is installed or removed here."""
    import site

    folders = [*site.getsitepackages(), site.getusersitepackages()]
    return tuple(os.stat(f).st_mtime_ns for f in folders if os.path.isdir(f))


@functools.lru_cache(maxsize=16)
def _engine_pins(extra: tuple[str, ...], markers: tuple[tuple[str, str], ...],
                 _stamp: tuple[int, ...]) -> Pins:
    from packaging.requirements import Requirement

    environment = {**dict(markers), "extra": ""}

    def applies(req: Requirement) -> bool:
        return req.marker is None or req.marker.evaluate(environment)

    installed = _installed()
    own = installed.get(OWN)
    if own is None:
        raise ConfigError("cloudlab is not installed as a package here (run from a source "
                          "folder?): pip install -e . in its checkout, then start again.")
    top = [r.name for r in map(Requirement, own.requires or [])
           if applies(r) and canonical(r.name) not in CLIENT_ONLY]
    for name in extra:
        req = Requirement(name)
        if canonical(req.name) not in installed:
            raise ConfigError(f"host_packages names {req.name}, which is not installed here: "
                              f"pip install it here first (hosts get this client's version).")
        top.append(req.name)
    versions: dict[str, str] = {}
    missing: dict[str, str] = {}
    stack = [Requirement(n) for n in top]
    while stack:
        req = stack.pop()
        name = canonical(req.name)
        if name in versions or name == OWN:
            continue
        dist = installed.get(name)
        if dist is None:
            missing.setdefault(name, f"{name}{req.specifier}")
            continue
        versions[name] = dist.version
        stack += [r for r in map(Requirement, dist.requires or []) if applies(r)]
    tops = dict.fromkeys(canonical(n) for n in top)
    return Pins(tuple(f"{n}=={versions[n]}" for n in tops if n in versions),
                tuple(f"{n}=={v}" for n, v in sorted(versions.items())),
                tuple(missing[n] for n in sorted(missing) if n not in tops))


# ------------------------------------------------------------------ cloudlab's own wheel
def own_wheel() -> Path:
    """A wheel of the cloudlab this process imported, versioned ``V+c<hash>`` by its files."""
    with _building:
        return _own_wheel()


def _own_wheel() -> Path:
    import cloudlab

    package = Path(cloudlab.__file__).parent
    files = sorted(p for p in package.rglob("*")
                   if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc")
    dist = metadata.distribution(OWN)
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(package.parent)).encode() + b"\0")
        digest.update(path.read_bytes())
    entry_points = dist.read_text("entry_points.txt") or ""
    digest.update(entry_points.encode())
    version = f"{dist.version.split('+')[0]}+c{digest.hexdigest()[:12]}"
    target = cache_dir() / f"{OWN}-{version}-py3-none-any.whl"
    if target.exists():
        return target
    meta = re.sub(r"(?m)^Version: .*$", f"Version: {version}", dist.read_text("METADATA") or
                  f"Metadata-Version: 2.1\nName: {OWN}\nVersion: {version}\n", count=1)
    contents = {str(p.relative_to(package.parent)): p.read_bytes() for p in files}
    info = f"{OWN}-{version}.dist-info"
    contents[f"{info}/METADATA"] = meta.encode()
    contents[f"{info}/WHEEL"] = _wheel_file("py3-none-any", pure=True)
    if entry_points:
        contents[f"{info}/entry_points.txt"] = entry_points.encode()
    _write_wheel(target, contents, info)
    return target


# ------------------------------------------------------------- wheels of installed packages
def installed_wheel(name: str) -> Path:
    """A wheel of installed distribution ``name``, rebuilt from its files (those inside
    site-packages: console scripts are made anew from its entry points on install)."""
    with _building:
        return _installed_wheel(name)


def _installed_wheel(name: str) -> Path:
    dist = _installed().get(canonical(name))
    if dist is None:
        raise ConfigError(f"{name} is not installed here, so it cannot be sent to the hosts: "
                          f"set packages = \"index\" in the profile to install it from theirs.")
    wheel_text = dist.read_text("WHEEL")
    if not wheel_text or not dist.files:
        raise ConfigError(f"{name} {dist.version} was not installed from a wheel here (no "
                          f"WHEEL or RECORD), so it cannot be sent to the hosts: reinstall it "
                          f"with pip, or set packages = \"index\" in the profile.")
    tags = [line.split(":", 1)[1].strip() for line in wheel_text.splitlines()
            if line.startswith("Tag:")]
    tag = _compressed(tags) if tags else "py3-none-any"
    stem = f"{re.sub(r'[-_.]+', '_', dist.metadata['Name'])}-{dist.version}"
    target = cache_dir() / f"{stem}-{tag}.whl"
    if target.exists():
        return target
    contents: dict[str, bytes] = {}
    info = None
    for file in dist.files:
        parts = Path(str(file)).parts
        if not parts or parts[0] == ".." or "__pycache__" in parts or str(file).endswith(".pyc"):
            continue
        if parts[0].endswith(".dist-info"):
            info = parts[0]
            if parts[-1] in INSTALLER_FILES:
                continue
        path = Path(dist.locate_file(file))  # type: ignore[arg-type]  # (a Path, typed SimplePath)
        if path.is_file():
            contents[str(file)] = path.read_bytes()
    if info is None:
        raise ConfigError(f"{name} {dist.version} has no .dist-info among its files, so it "
                          f"cannot be sent to the hosts: set packages = \"index\".")
    _write_wheel(target, contents, info)
    return target


def _compressed(tags: list[str]) -> str:
    """Wheel tags ``i-a-p`` as a file name carries several: ``py2.py3-none-any``."""
    parts = zip(*(t.split("-") for t in tags))
    return "-".join(".".join(dict.fromkeys(values)) for values in parts)


def _wheel_file(tag: str, pure: bool) -> bytes:
    return (f"Wheel-Version: 1.0\nGenerator: cloudlab\nRoot-Is-Purelib: "
            f"{'true' if pure else 'false'}\nTag: {tag}\n").encode()


def _write_wheel(target: Path, contents: dict[str, bytes], info: str) -> None:
    """A wheel file of ``contents`` with its RECORD, written whole or not at all."""
    record = io.StringIO()
    writer = csv.writer(record, lineterminator="\n")
    for name, data in sorted(contents.items()):
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=")
        writer.writerow([name, f"sha256={digest.decode()}", len(data)])
    writer.writerow([f"{info}/RECORD", "", ""])
    partial = target.with_name(f".{target.name}.{os.getpid()}")
    contents = {**contents, f"{info}/RECORD": record.getvalue().encode()}
    with zipfile.ZipFile(partial, "w") as wheel:
        for name, data in sorted(contents.items()):
            entry = zipfile.ZipInfo(name, EPOCH)
            entry.external_attr = 0o644 << 16
            wheel.writestr(entry, data, zipfile.ZIP_DEFLATED, 1)
    os.replace(partial, target)


def python_tag() -> str:
    """This interpreter as the hosts' probe reports theirs: ``3.11 x86_64 Linux``."""
    import platform

    return f"{sys.version_info[0]}.{sys.version_info[1]} {platform.machine()} {platform.system()}"


def client_wheels(pins: Pins, markers: dict[str, str]) -> list[Path]:
    """The wheels a host without a package index installs ``pins`` from: this client's own
    installed packages, and (downloaded here, through this client's pip and its cache) those
    the host's Python needs that this client lacks."""
    found = [installed_wheel(name) for name in pins.names]
    return found + download(list(pins.missing), markers, set(pins.names))


def download(specs: list[str], markers: dict[str, str], have: set[str]) -> list[Path]:
    """Wheels for requirements ``specs`` and what they need on a host with ``markers``
    (except the packages in ``have``), from ``downloads`` in the cache or this client's
    index: for a host whose Python needs a package this one does not (a backport)."""
    import subprocess

    from packaging.requirements import Requirement
    from packaging.utils import parse_wheel_filename

    folder = cache_dir() / "downloads"
    folder.mkdir(exist_ok=True)
    got: list[Path] = []
    queue = [Requirement(s) for s in specs]
    while queue:
        req = queue.pop()
        name = canonical(req.name)
        if name in have:
            continue
        have.add(name)
        cached = [p for p in folder.glob("*.whl")
                  if canonical(parse_wheel_filename(p.name)[0]) == name
                  and req.specifier.contains(parse_wheel_filename(p.name)[1], prereleases=True)]
        if not cached:
            done = subprocess.run(
                [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                 "--only-binary=:all:", "--python-version", markers["python_version"],
                 "--dest", str(folder), str(Requirement(f"{req.name}{req.specifier}"))],
                capture_output=True, text=True, timeout=300)
            cached = [p for p in folder.glob("*.whl")
                      if canonical(parse_wheel_filename(p.name)[0]) == name]
            if done.returncode != 0 or not cached:
                said = (done.stderr.strip().splitlines() or ["no output"])[-1]
                raise ConfigError(
                    f"The hosts' Python {markers['python_full_version']} needs {req}, which "
                    f"this client lacks and could not download ({said}): pip install it "
                    f"here, or set packages = \"index\" in the profile.")
        wheel = max(cached, key=lambda p: parse_wheel_filename(p.name)[1])
        got.append(wheel)
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            text = z.read(meta).decode()
        for line in re.findall(r"(?m)^Requires-Dist: (.*)$", text):
            dep = Requirement(line)
            if dep.marker is None or dep.marker.evaluate({**markers, "extra": ""}):
                queue.append(dep)
    return got

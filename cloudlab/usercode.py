"""The user's own modules, for engines wherever they run: files beside the notebook, the
script's folder, packages installed editable (``pip install -e``).

cloudpickle sends a function of an importable module by reference (``mytools.triple``), so
the engine imports ``mytools``: a host that shares no files with the client has no such
module. A :class:`Watcher` finds every module imported here whose source is not installed
from an index (not under the interpreter's prefixes or a site-packages folder), packs the
files of each (a package's whole folder) into one archive named by its content hash, and
tells cheaply when they change: a new module imported, or a file's size or time changed.
A cluster's :class:`EngineCode` sends the archive to its engines when its hash differs
from theirs (:func:`cloudlab.onhost.calls.install_code` unpacks it there and drops the old
modules).

Only Python source travels (a package's ``.py`` files): data files are not shipped, since
they are pushed (``c.push``) where engines need them.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import site
import sys
import sysconfig
import threading
import zipfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from . import _aio
from .errors import ConfigError

#: More than this is no longer "a few modules": the sync refuses, saying so.
MAX_BYTES = 50 * 2**20
#: Folders never packed (caches, version control, environments inside a project).
SKIPPED = {"__pycache__", ".git", ".hg", ".svn", ".ipynb_checkpoints", ".venv", "venv",
           "node_modules", ".mypy_cache", ".pytest_cache", ".ruff_cache"}
EPOCH = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class Bundle:
    """The user's modules as one archive: what engines unpack and import from."""

    digest: str
    archive: bytes
    modules: tuple[str, ...]  # top-level names
    files: int

    def describe(self) -> str:
        """``mytools, mypkg (4 files, 12 KB)``."""
        names = ", ".join(self.modules[:6]) + (f" and {len(self.modules) - 6} more"
                                                 if len(self.modules) > 6 else "")
        return f"{names} ({self.files} file{'s' * (self.files != 1)}, " \
               f"{_size(len(self.archive))})"


def _size(n: int) -> str:
    return f"{n} bytes" if n < 1024 else f"{n / 1024:.0f} KB" if n < 2**20 else \
        f"{n / 2**20:.1f} MB"


def _installed_roots() -> tuple[str, ...]:
    """Folders whose modules come from the interpreter or an index, not from the user."""
    roots = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix}
    for scheme_path in ("stdlib", "platstdlib", "purelib", "platlib"):
        roots.add(sysconfig.get_paths()[scheme_path])
    roots.update(site.getsitepackages())
    roots.add(site.getusersitepackages())
    return tuple(os.path.realpath(r) + os.sep for r in roots if r)


class Watcher:
    """Which of the modules imported here are the user's, and their archive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._roots = _installed_roots()
        self._seen = -1  # len(sys.modules) when last scanned
        self._sources: dict[str, Path] = {}  # top-level name -> its file or package folder
        self._modules: dict[str, object] = {}  # top-level name -> the module, when scanned
        self._stamps: dict[Path, tuple[int, int]] = {}
        self._bundle: Bundle | None = None

    def _scan(self) -> dict[str, Path]:
        found = {}
        for name, module in list(sys.modules.items()):
            if "." in name or name.startswith("__") or name == "cloudlab" or module is None:
                continue
            file = getattr(module, "__file__", None)
            if not file or not file.endswith(".py"):
                continue
            path = os.path.realpath(file)
            if path.startswith(self._roots):
                continue
            found[name] = Path(path).parent if hasattr(module, "__path__") else Path(path)
        return found

    def _files(self) -> list[tuple[str, Path]]:
        """(name in the archive, file) for every module found."""
        files = []
        for name, source in sorted(self._sources.items()):
            if source.is_file():
                files.append((source.name, source))
                continue
            for folder, dirs, names in os.walk(source):
                dirs[:] = sorted(d for d in dirs if d not in SKIPPED and not d.startswith("."))
                for file in sorted(names):
                    if file.endswith(".py"):  # code only: data files are pushed, not synced
                        path = Path(folder, file)
                        files.append((f"{name}/{path.relative_to(source)}", path))
        return files

    def _stale(self) -> bool:
        # A module imported or dropped changes the count; one of ours replaced by another
        # (the count unchanged) shows in our own modules' entries.
        if len(sys.modules) != self._seen or any(
                sys.modules.get(name) is not module for name, module in self._modules.items()):
            self._seen = len(sys.modules)
            sources = self._scan()
            self._modules = {name: sys.modules[name] for name in sources}
            if sources != self._sources:
                self._sources = sources
                return True
        for path, stamp in self._stamps.items():
            try:
                info = path.stat()
            except OSError:
                return True
            if (info.st_mtime_ns, info.st_size) != stamp:
                return True
        return False

    def current(self, rescan: bool = False) -> Bundle | None:
        """The archive of the user's modules as they are now (None: there are none)."""
        with self._lock:
            if rescan:
                self._seen = -1
            if self._stale() or (self._bundle is None and self._sources):
                self._bundle = self._pack()
            return self._bundle if self._sources else None

    def _pack(self) -> Bundle | None:
        buffer = io.BytesIO()
        stamps = {}
        total = 0
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for arcname, path in self._files():
                try:
                    info = path.stat()
                    data = path.read_bytes()
                except OSError:
                    continue
                total += len(data)
                if total > MAX_BYTES:
                    raise ConfigError(
                        f"Your own modules ({', '.join(sorted(self._sources))}) hold over "
                        f"{_size(MAX_BYTES)} of files, too much to send to every engine: move "
                        f"data files out of their folders and push the data instead "
                        f"(c.push(name=value)).")
                stamps[path] = (info.st_mtime_ns, info.st_size)
                archive.writestr(zipfile.ZipInfo(arcname, EPOCH), data, zipfile.ZIP_DEFLATED)
        self._stamps = stamps
        data = buffer.getvalue()
        return Bundle(hashlib.sha256(data).hexdigest()[:16], data,
                      tuple(sorted(self._sources)), len(stamps))


_watcher: Watcher | None = None


def watcher() -> Watcher:
    """This process's one watcher (every cluster asks it)."""
    global _watcher
    if _watcher is None:
        _watcher = Watcher()
    return _watcher


class EngineCode:
    """The user's modules as one cluster's engines have them, sent again when they change.

    ``install(ids, bundle)`` gives engines ``ids`` a bundle; ``usable()`` names the engines
    a sync gives it to (engines joining later get it through :meth:`welcome`).
    """

    def __init__(self, install: Callable[[list[int], Bundle], Awaitable[None]],
                 usable: Callable[[], list[int]]):
        self._install, self._usable = install, usable
        #: What the engines have (None: nothing sent yet).
        self.bundle: Bundle | None = None
        self._lock = asyncio.Lock()

    def current(self) -> bool:
        """Whether the engines have the user's modules as they are now (a cheap look)."""
        return self._have(watcher().current())

    def _have(self, bundle: Bundle | None) -> bool:
        return bundle is None or (self.bundle is not None and bundle.digest == self.bundle.digest)

    async def sync(self, rescan: bool = False) -> Bundle | None:
        """Send the modules where they changed (with ``rescan``, look at every file again:
        slower, and in a thread); what the engines now have."""
        bundle = (await _aio.to_thread(watcher().current, rescan) if rescan
                  else watcher().current())
        if bundle is None or self._have(bundle):
            return self.bundle
        async with self._lock:
            if not self._have(bundle):
                ids = self._usable()
                if ids:
                    await self._install(ids, bundle)
                self.bundle = bundle
        return self.bundle

    async def welcome(self, ids: list[int]) -> None:
        """Engines joining get the modules the others have (the current ones, if none)."""
        bundle = self.bundle if self.bundle is not None else watcher().current()
        if bundle is not None:
            await self._install(ids, bundle)
            self.bundle = bundle

"""Functions that run on engines (imported there, never called on the client).

One namespace per engine: on ipyparallel it is the engine's IPython user
namespace (where ``%px`` code runs too); on Dask it is a module-level dict;
for engines that share the client's process (the ``inprocess`` kind, a thread
each), the one :func:`as_engine` gives the running thread.
``c.push`` writes into it, ``c.pull`` reads it, the cell magic executes in it,
and functions sent by ``c.map``/``c.submit`` resolve pushed names in it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import linecache
import os
import socket
import sys
import threading
import traceback
import types
from typing import Any, NamedTuple, TextIO

import cloudpickle

from ..shared import SharedValue

_DASK_NAMESPACE: dict[str, Any] = {"__name__": "__main__", "__builtins__": __builtins__}

#: The engine this thread is, where engines are threads of the client's process: its id,
#: its namespace and where its output goes now.
_thread_engine = threading.local()


@contextlib.contextmanager
def as_engine(eid: int, ns: dict[str, Any]):
    """Run this thread as engine ``eid`` of the client's own process, with namespace ``ns``."""
    _thread_engine.state = [eid, ns, None, None]
    try:
        yield
    finally:
        _thread_engine.state = None


@contextlib.contextmanager
def captured(out: io.TextIOBase, err: io.TextIOBase):
    """What this engine prints goes to ``out`` and ``err``: redirected where the engine is a
    process, routed where it is a thread (``redirect_stdout`` would swap the stream of every
    thread at once)."""
    state = getattr(_thread_engine, "state", None)
    if state is None:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            yield
        return
    _ThreadRouted.install()  # (again: something may have set sys.stdout since)
    before, state[2:] = state[2:], [out, err]
    try:
        yield
    finally:
        state[2:] = before


class _ThreadRouted(io.TextIOBase):
    """``sys.stdout``/``sys.stderr`` once engines run as threads: a write goes to the writing
    thread's engine stream where it has one, else where it went before."""

    def __init__(self, before: TextIO, which: int):
        self.before, self.which = before, which

    @classmethod
    def install(cls) -> None:
        if not isinstance(sys.stdout, cls):
            sys.stdout = cls(sys.stdout, 2)
        if not isinstance(sys.stderr, cls):
            sys.stderr = cls(sys.stderr, 3)

    def _target(self):
        state = getattr(_thread_engine, "state", None)
        return self.before if state is None or state[self.which] is None else state[self.which]

    def writable(self) -> bool:
        return True

    @property  # (a read-only attribute of io.TextIOBase's, here the stream's own)
    def encoding(self) -> str:  # type: ignore[override]
        return self.before.encoding

    def isatty(self) -> bool:
        return self.before.isatty()

    def fileno(self) -> int:
        return self.before.fileno()

    def write(self, text: str) -> int:
        return self._target().write(text)

    def flush(self) -> None:
        self._target().flush()

    def __getattr__(self, name: str):
        return getattr(self.before, name)


def namespace() -> dict[str, Any]:
    """This engine's user namespace: its IPython shell's (ipyparallel), else cloudlab's own."""
    state = getattr(_thread_engine, "state", None)
    if state is not None:
        return state[1]
    ipython = sys.modules.get("IPython")  # no shell without it: importing it costs 80 ms
    shell = ipython.get_ipython() if ipython is not None else None
    return shell.user_ns if shell is not None else _DASK_NAMESPACE


def identity() -> tuple[str, int]:
    """Where the engine runs: its host (a Slurm job's node name) and pid."""
    return os.environ.get("SLURMD_NODENAME") or socket.gethostname(), os.getpid()


def store(values: dict[str, Any]) -> None:
    namespace().update({name: value.load() if isinstance(value, SharedValue) else value
                        for name, value in values.items()})


def drop(names: list[str]) -> None:
    ns = namespace()
    for name in names:
        ns.pop(name, None)


def fetch(name: str) -> Any:
    ns = namespace()
    if name not in ns:
        raise NameError(f"name {name!r} is not defined on this engine")
    return ns[name]


#: The folder this engine imports the user's modules from (see :func:`install_code`).
_code_folder: str | None = None


def install_code(digest: str, archive: bytes, modules: tuple[str, ...]) -> str:
    """Import the user's modules from ``archive`` (:mod:`cloudlab.usercode`) from now on:
    it is unpacked once per host into the runtime folder, put first on the import path,
    and the modules an earlier archive (or the path) gave are dropped, so the next use
    imports them anew (names bound to them in the namespace follow)."""
    global _code_folder
    import importlib
    import tempfile
    import zipfile

    from ..security import runtime_dir

    folder = runtime_dir() / "code" / digest
    if not folder.is_dir():
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f".{digest}-", dir=folder.parent)
        with zipfile.ZipFile(io.BytesIO(archive)) as z:
            z.extractall(staging)
        try:
            os.replace(staging, folder)
        except OSError:  # another engine of this host was first
            import shutil

            shutil.rmtree(staging, ignore_errors=True)
    if _code_folder in sys.path:
        sys.path.remove(_code_folder)
    _code_folder = str(folder)
    sys.path.insert(0, _code_folder)
    importlib.invalidate_caches()
    dropped = {name for name in list(sys.modules)
               if name.split(".")[0] in modules}
    for name in dropped:
        del sys.modules[name]
    _materialise.cache_clear()
    ns = namespace()
    for key, value in list(ns.items()):
        if isinstance(value, types.ModuleType) and value.__name__ in dropped:
            ns[key] = importlib.import_module(value.__name__)
    return _code_folder


def is_interactive(fn) -> bool:
    """A function that travels by value (notebook, lambda, nested), not by import name."""
    return isinstance(fn, types.FunctionType) and (
        fn.__module__ == "__main__" or "<locals>" in fn.__qualname__
        or fn.__name__ == "<lambda>")


class Shipped:
    """A client function, pickled once with cloudpickle, with pushed names left out.

    On the engine, the function's globals are the engine namespace overlaid with
    the client globals it referenced; names the user pushed are taken from the
    engine, so per-engine values (``scatter``) are seen as such.
    """

    def __init__(self, fn, pushed: frozenset[str] = frozenset()):
        self.__name__ = getattr(fn, "__name__", type(fn).__name__)  # (for errors)
        if is_interactive(fn):
            kept = {k: v for k, v in fn.__globals__.items() if k not in pushed}
            clone = types.FunctionType(fn.__code__, kept, fn.__name__, fn.__defaults__,
                                       fn.__closure__)
            clone.__kwdefaults__, clone.__module__ = fn.__kwdefaults__, fn.__module__
            clone.__qualname__ = fn.__qualname__
            fn = clone
            self.source = _source_of(fn.__code__)
        else:
            self.source = None
        self.payload = cloudpickle.dumps(fn)

    def __call__(self, *args, **kwargs):
        return _materialise(self.payload, self.source, engine_id())(*args, **kwargs)


#: Source files larger than this are not sent along for tracebacks.
MAX_SOURCE_BYTES = 256 * 1024


def _source_of(code: types.CodeType) -> tuple[str, tuple[str, ...]] | None:
    """(file name, lines) of a function's source, so remote tracebacks can quote it.

    cloudpickle replaces a shipped function's file name with ``<dynamic-code>``;
    sending the name and lines along lets the engine restore both.
    """
    lines = linecache.getlines(code.co_filename)
    if not lines or sum(map(len, lines)) > MAX_SOURCE_BYTES:
        return None
    return code.co_filename, tuple(lines)


@functools.lru_cache(maxsize=32)
def _materialise(payload: bytes, source: tuple[str, tuple[str, ...]] | None, engine: int):
    """The function in ``payload``, its globals overlaid on ``engine``'s namespace (once per
    engine: engines that are threads of one process each have their own)."""
    fn = cloudpickle.loads(payload)
    if is_interactive(fn):
        code = fn.__code__
        if source is not None:
            filename, lines = source
            linecache.cache[filename] = (sum(map(len, lines)), None, list(lines), filename)
            code = _renamed(code, filename)
        merged = _Overlay(namespace(), fn.__globals__)
        fn = types.FunctionType(code, merged, fn.__name__, fn.__defaults__, fn.__closure__)
    return fn


def _renamed(code: types.CodeType, filename: str) -> types.CodeType:
    """``code`` and the code objects nested in it, with their file name restored."""
    consts = tuple(_renamed(c, filename) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    return code.replace(co_filename=filename, co_consts=consts)


class _Overlay(dict):
    """Globals for a shipped function: its captured names, then the engine namespace.

    A dict subclass whose ``__missing__`` falls through to the live namespace, so
    names pushed after the function was first shipped are still found.
    """

    def __init__(self, ns: dict, captured: dict):
        super().__init__(captured)
        self["__builtins__"] = ns.get("__builtins__", __builtins__)
        self._ns = ns

    def __missing__(self, key):
        return self._ns[key]


_THIS_FILE = os.path.join("cloudlab", "onhost", "calls.py")


class Failure:
    """An exception raised on an engine, returned as a value.

    Returning (not raising) keeps both engines' own error wrapping out of the
    way: the client sees the same structure from ipyparallel and Dask, knows
    which engine failed, and collapses identical failures across engines.
    """

    def __init__(self, exc: BaseException):
        self.engine = engine_id()
        self.ename = type(exc).__name__
        self.evalue = str(exc)
        #: The file an engine could not find (the client says whether it has it).
        self.missing_file = exc.filename if isinstance(exc, FileNotFoundError) else None
        # This module's frames are cloudlab's, not the user's: by its name, since
        # ipyparallel sends functions by value, with the client's file names in them.
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if not f.filename.endswith(_THIS_FILE)]
        self.traceback = "Traceback (most recent call last):\n" + "".join(
            traceback.format_list(frames)) + "".join(
            traceback.format_exception_only(type(exc), exc))

    @classmethod
    def of(cls, engine: int, ename: str, evalue: str, traceback_text: str) -> Failure:
        """One reported by an engine's own client (ipyparallel's errors of a cell)."""
        failure = cls.__new__(cls)
        failure.engine, failure.ename, failure.evalue = engine, ename, evalue
        failure.missing_file, failure.traceback = None, traceback_text
        return failure

    def as_tuple(self) -> tuple[str, str, str]:
        """(type, message, traceback), as the client reports it: a file the engine lacks
        but the client has is said to be one (data files do not travel with code)."""
        evalue = self.evalue
        if self.missing_file and os.path.exists(self.missing_file):
            evalue += (": that file is on this client, not where the engines run (files do "
                       "not travel with code): read it here and push the data, "
                       "c.push(name=value)")
        return self.ename, evalue, self.traceback


def engine_id() -> int:
    state = getattr(_thread_engine, "state", None)
    if state is not None:
        return state[0]
    return int(os.environ.get("CLOUDLAB_ENGINE_ID", "-1"))


class Result(NamedTuple):
    """What an engine sends back for one call: who ran it, the value, what it printed."""

    engine: int
    value: Any  # a Failure if the call raised
    stdout: str = ""
    stderr: str = ""


def call(fn, *args) -> Result:
    """Run ``fn(*args)``, capturing its output; an exception comes back as a :class:`Failure`.

    Output is captured on both engine kinds alike (Dask would otherwise drop it)
    and printed by the client in the cell that caused it, prefixed by engine id.
    """
    out, err = io.StringIO(), io.StringIO()
    with captured(out, err):
        try:
            value = fn(*args)
        except Exception as exc:
            value = Failure(exc)
    return Result(engine_id(), value, out.getvalue(), err.getvalue())


def call_packed(packed: bytes) -> Result:
    """``call`` with ``(fn, args)`` pickled once by the client for every engine it goes to."""
    fn, args = cloudpickle.loads(packed)
    return call(fn, *args)


def run_chunk(fn, items: list) -> list:
    """The unit of work for ``c.map``: apply ``fn`` to a slice of the items."""
    return [fn(x) for x in items]


def execute_cell(code: str, topic: str, token: str):
    """Dask: run notebook code in the namespace, streaming output as events."""
    from distributed import get_worker

    worker = get_worker()
    eid = engine_id()

    def stream(name: str) -> LineStream:
        return LineStream(lambda text: worker.log_event(
            topic, {"token": token, "engine": eid, "stream": name, "text": text}))

    out, err = stream("stdout"), stream("stderr")
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            exec(compile(code, "<cell>", "exec"), namespace())
        return Result(eid, None)
    except Exception as exc:
        return Result(eid, Failure(exc))
    finally:
        out.flush()
        err.flush()
        worker.log_event(topic, {"token": token, "engine": eid, "done": True})


class LineStream(io.TextIOBase):
    """Hands each complete line (or what a flush ends) to ``send``: output streamed as it is
    printed, a line at a time rather than a write at a time."""

    def __init__(self, send):
        self.send, self.pending = send, ""

    def writable(self):
        return True

    def write(self, text):
        self.pending += text
        if "\n" in self.pending:
            head, _, self.pending = self.pending.rpartition("\n")
            self.send(head + "\n")
        return len(text)

    def flush(self):
        if self.pending:
            self.send(self.pending)
            self.pending = ""

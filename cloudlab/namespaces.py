"""The engines' namespaces, as a Cluster offers them: push, pull, scatter, gather, execute.

Every engine has one namespace (see :mod:`cloudlab._remote`). These methods
move named values in and out of it, and run notebook code in it. They are a
part of :class:`~cloudlab.Cluster` kept in a module of their own; they rely on
the cluster's ``_on`` (run a function on some engines) and its state checks.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any

from . import _aio, _remote, policy
from .errors import RemoteError, format_ids
from .output import PrefixedSink
from .shared import SharedBlock, share


class EngineNamespaces:
    """Named values on every engine; mixed into :class:`~cloudlab.Cluster`.

    On a backend whose engines share the client's machine, ``push`` and
    ``scatter`` put large buffers in shared memory once (:mod:`cloudlab.shared`)
    instead of copying them to each engine; ``_shared`` holds that memory until
    the name is bound again or the cluster stops.
    """

    _shared: dict[str, list[SharedBlock]]
    _share_memory: bool = True

    def push(self, **values: Any) -> None:
        """Bind each ``name=value`` in every engine's namespace."""
        _aio.run(self._push(values))

    async def apush(self, **values: Any) -> None:
        await _aio.wrap(self._push(values))

    async def _push(self, values: dict[str, Any]) -> None:
        self._require_running()
        blocks = await self._store(None, values)
        self._keep_shared(values, {name: [block] for name, block in blocks.items()})
        self._pushed.update(values)

    async def _store(self, ids: list[int] | None, values: dict[str, Any]) -> dict[str, SharedBlock]:
        """Bind ``values`` on engines ``ids`` (None: all); the shared memory now holding some."""
        blocks: dict[str, SharedBlock] = {}
        if self._backend.same_machine and self._share_memory:
            for name, value in values.items():
                if (block := await _aio.to_thread(share, value)) is not None:
                    blocks[name] = block
        try:
            await self._on(ids, _remote.store,
                           {k: blocks[k].value if k in blocks else v for k, v in values.items()})
        except RemoteError as error:
            for block in blocks.values():
                block.close()
            if not blocks or {e[0] for e in error.failures.values()} != {"SharedMemoryUnavailable"}:
                raise
            self._share_memory = False  # engines cannot map our memory: the ordinary way, always
            await self._on(ids, _remote.store, values)
            return {}
        return blocks

    def _keep_shared(self, names: Iterable[str], blocks: dict[str, list[SharedBlock]]) -> None:
        """``names`` were bound anew: their previous memory goes (once engines drop it)."""
        for name in names:
            for old in self._shared.pop(name, []):
                old.close()
        self._shared.update({name: kept for name, kept in blocks.items() if kept})

    def _release_shared(self) -> None:
        for blocks in self._shared.values():
            for block in blocks:
                block.close()
        self._shared.clear()

    def pull(self, name: str) -> dict[int, Any]:
        """The value of ``name`` on each engine, by engine id."""
        return _aio.run(self._pull(name))

    async def apull(self, name: str) -> dict[int, Any]:
        return await _aio.wrap(self._pull(name))

    async def _pull(self, name: str) -> dict[int, Any]:
        self._require_running()
        return await self._on(None, _remote.fetch, name)

    def scatter(self, name: str, sequence: Iterable) -> None:
        """Cut ``sequence`` into contiguous parts, one per engine, bound to ``name``."""
        _aio.run(self._scatter(name, sequence))

    async def ascatter(self, name: str, sequence: Iterable) -> None:
        await _aio.wrap(self._scatter(name, sequence))

    async def _scatter(self, name: str, sequence: Iterable) -> None:
        self._require_running()
        await self._joined()
        ids = self.engine_ids
        parts = policy.partition(sequence if hasattr(sequence, "__getitem__") else list(sequence),
                                 len(ids))
        stored = await asyncio.gather(*(self._store([eid], {name: part})
                                        for eid, part in zip(ids, parts)))
        self._keep_shared([name], {name: [b[name] for b in stored if name in b]})
        self._pushed.add(name)

    def gather(self, name: str) -> list:
        """Concatenate ``name`` from every engine, in engine order (undoes ``scatter``)."""
        return _aio.run(self._gather(name))

    async def agather(self, name: str) -> list:
        return await _aio.wrap(self._gather(name))

    async def _gather(self, name: str) -> Any:
        parts = await self._pull(name)
        ordered = [parts[eid] for eid in sorted(parts)]
        if ordered and type(ordered[0]).__module__ == "numpy":
            import numpy

            return numpy.concatenate(ordered)
        return [x for part in ordered for x in part]

    def execute(self, code: str, sink: Callable[[int, str, str], None] | None = None,
                targets: list[int] | None = None) -> None:
        """Run ``code`` on every engine (or ``targets``); output goes to ``sink(id, stream, text)``."""
        _aio.run(self._execute(code, sink, targets))

    async def aexecute(self, code: str, sink=None, targets: list[int] | None = None) -> None:
        await _aio.wrap(self._execute(code, sink, targets))

    async def _execute(self, code: str, sink, targets) -> None:
        self._require_running()
        await self._joined()
        ids = self.engine_ids if targets is None else list(targets)
        unknown = sorted(set(ids) - set(self._processes))
        if unknown:
            raise ValueError(f"No engine {unknown[0]} in cluster {self.name}: "
                             f"engines are {format_ids(self.engine_ids)}.")
        await self._engine.execute(code, ids, sink or PrefixedSink())

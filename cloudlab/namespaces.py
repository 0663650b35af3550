"""The engines' namespaces, as a Cluster offers them: push, pull, scatter, gather, execute.

Every engine has one namespace (see :mod:`cloudlab.onhost.calls`). These methods
move named values in and out of it, and run notebook code in it. They are a
part of :class:`~cloudlab.Cluster` kept in a module of their own, built on its
work (:mod:`cloudlab.work`); what else they rely on of the cluster is declared at
the top of the class.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, cast

from . import _aio, policy
from .dispatch import on_each
from .engines.base import settle
from .errors import RemoteError, format_ids
from .onhost import calls
from .output import PrefixedSink
from .shared import SharedBlock, share
from .work import EngineWork

if TYPE_CHECKING:
    from .backends.base import Backend


class EngineNamespaces(EngineWork):
    """Named values on every engine, moved by functions run there (:class:`EngineWork`);
    mixed into :class:`~cloudlab.Cluster`.

    On a backend whose engines share the client's machine, ``push`` and
    ``scatter`` put large buffers in shared memory once (:mod:`cloudlab.shared`)
    instead of copying them to each engine; ``_shared`` holds that memory until
    the name is bound again or the cluster stops.
    """

    _shared: dict[str, list[SharedBlock]]
    _share_memory: bool = True
    #: Each pushed name's value as it was sent (a shared value's handle, where shared), kept
    #: so that engines that join later (scale, a replacement) are given it too.
    _pushed: dict[str, Any]
    #: Each scattered name's parts in order, with the engine holding each: the part of an
    #: engine that went is given to the next engine that joins, and gather keeps the order.
    _scattered: dict[str, list[tuple[int, Any]]]

    if TYPE_CHECKING:  # what the cluster gives (see cloudlab.cluster.Cluster)
        name: str
        _backend: Backend

    def _engine_names(self) -> frozenset[str]:
        """Names the engines hold for the user (a shipped function takes them from there)."""
        return frozenset(self._pushed) | frozenset(self._scattered)

    async def _welcome(self, ids: list[int]) -> None:
        """Engines joining the cluster get what the others were given: the user's modules
        (first: pushed values may be of their classes), every pushed name, and the parts
        of scattered names whose engines have gone."""
        await self._code.welcome(ids)
        given: dict[int, dict[str, Any]] = {eid: dict(self._pushed) for eid in ids}
        for name, parts in self._scattered.items():
            joining = iter(ids)
            for i, (holder, part) in enumerate(parts):
                if holder not in self._members.processes:
                    eid = next(joining, None)
                    if eid is None:
                        break
                    given[eid][name] = part
                    parts[i] = (eid, part)
        given = {eid: values for eid, values in given.items() if values}
        if given:
            await asyncio.gather(*(self._each([eid], "giving a new engine the pushed names",
                                              calls.store, values)
                                   for eid, values in given.items()))

    def push(self, **values: Any) -> None:
        """Bind each ``name=value`` in every engine's namespace."""
        _aio.run(self._push(values))

    async def apush(self, **values: Any) -> None:
        await _aio.wrap(self._push(values))

    async def _push(self, values: dict[str, Any]) -> None:
        self._require_running()
        blocks = await self._store(None, values, "push")
        self._keep_shared(values, {name: [block] for name, block in blocks.items()})
        self._pushed.update({k: blocks[k].value if k in blocks else v for k, v in values.items()})
        for name in values:
            self._scattered.pop(name, None)

    async def _store(self, ids: list[int] | None, values: dict[str, Any],
                     call: str) -> dict[str, SharedBlock]:
        """Bind ``values`` on engines ``ids`` (None: all), as ``call`` (its name in errors);
        the shared memory now holding some."""
        blocks: dict[str, SharedBlock] = {}
        if self._backend.same_machine and self._share_memory:
            for name, value in values.items():
                if (block := await _aio.to_thread(share, value)) is not None:
                    blocks[name] = block
        try:
            sent = {k: blocks[k].value if k in blocks else v for k, v in values.items()}
            await self._on(ids, calls.store, sent, call=call)
        except RemoteError as error:
            for block in blocks.values():
                block.close()
            if not blocks or {e[0] for e in error.failures.values()} != {"SharedMemoryUnavailable"}:
                raise
            self._share_memory = False  # engines cannot map our memory: the ordinary way, always
            await self._on(ids, calls.store, values, call=call)
            return {}
        return blocks

    def _keep_shared(self, names: Iterable[str], blocks: dict[str, list[SharedBlock]]) -> None:
        """``names`` were bound anew: their previous memory goes (once engines drop it)."""
        for name in names:
            for old in self._shared.pop(name, []):
                old.close()
        self._shared.update({name: kept for name, kept in blocks.items() if kept})

    def _release_namespaces(self) -> None:
        """The cluster stopped: what was kept for joining engines goes, with its memory."""
        self._pushed.clear()
        self._scattered.clear()
        for blocks in self._shared.values():
            for block in blocks:
                block.close()
        self._shared.clear()

    def forget(self, *names: str) -> None:
        """Remove pushed or scattered ``names`` from every engine, and from what engines
        that join later are given (their memory goes with them)."""
        _aio.run(self._forget(names))

    async def aforget(self, *names: str) -> None:
        await _aio.wrap(self._forget(names))

    async def _forget(self, names: tuple[str, ...]) -> None:
        self._require_running()
        for name in names:
            self._pushed.pop(name, None)
            self._scattered.pop(name, None)
        await self._on(None, calls.drop, list(names), call=f"forget {', '.join(names)}")
        self._keep_shared(names, {})

    def pull(self, name: str) -> dict[int, Any]:
        """The value of ``name`` on each engine, by engine id."""
        return _aio.run(self._pull(name))

    async def apull(self, name: str) -> dict[int, Any]:
        return await _aio.wrap(self._pull(name))

    async def _pull(self, name: str) -> dict[int, Any]:
        self._require_running()
        return await self._on(None, calls.fetch, name, call=f"pull {name}")

    def scatter(self, name: str, sequence: Iterable) -> None:
        """Cut ``sequence`` into contiguous parts, one per engine, bound to ``name``."""
        _aio.run(self._scatter(name, sequence))

    async def ascatter(self, name: str, sequence: Iterable) -> None:
        await _aio.wrap(self._scatter(name, sequence))

    async def _scatter(self, name: str, sequence: Iterable) -> None:
        self._require_running()
        await self._joined()
        ids = self.engine_ids
        sliceable = sequence if hasattr(sequence, "__getitem__") else list(sequence)
        parts = policy.partition(cast(Sequence, sliceable), len(ids))  # (arrays too)
        stored = await asyncio.gather(*(self._store([eid], {name: part}, f"scatter {name}")
                                        for eid, part in zip(ids, parts)))
        self._keep_shared([name], {name: [b[name] for b in stored if name in b]})
        self._scattered[name] = [(eid, b[name].value if name in b else part)
                                 for eid, part, b in zip(ids, parts, stored)]
        self._pushed.pop(name, None)

    def gather(self, name: str) -> list:
        """Concatenate ``name`` from every engine, in engine order (undoes ``scatter``)."""
        return _aio.run(self._gather(name))

    async def agather(self, name: str) -> list:
        return await _aio.wrap(self._gather(name))

    async def _gather(self, name: str) -> Any:
        holders = [eid for eid, _ in self._scattered.get(name, [])]
        if holders:  # in the order scattered, wherever each part is now
            self._require_running()
            gone = [i for i, eid in enumerate(holders) if eid not in self._members.processes]
            if gone:
                raise ValueError(
                    f"Part {gone[0]} of {name!r} was on an engine that has gone, and no "
                    f"engine has joined to take it yet: scale the cluster up, or scatter "
                    f"{name!r} again.")
            parts = await self._on(holders, calls.fetch, name, call=f"gather {name}")
            ordered = [parts[eid] for eid in holders]
        else:
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
        await self._sync_code()
        ids = self.engine_ids if targets is None else list(targets)
        unknown = sorted(set(ids) - set(self.engine_ids))
        if unknown:
            raise ValueError(f"No engine {unknown[0]} in cluster {self.name}: "
                             f"engines are {format_ids(self.engine_ids)}.")
        sink = sink or PrefixedSink()
        results = await on_each(self._members, ids, "execute",
                                lambda: self._engine.execute_each(code, ids, sink), sink)
        settle(results.values(), sink)

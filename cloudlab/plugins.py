"""Engines, backends and workloads resolved by short name through entry points.

A new backend is one module plus one line under ``[project.entry-points."cloudlab.backends"]``
in its package's pyproject; nothing in cloudlab changes: clusters start on it, and the
``cloudlab`` command's doctor and gc ask it (see :class:`~cloudlab.backends.base.Backend`).
A workload is a module under ``"cloudlab.workloads"`` (see :mod:`cloudlab.workloads`).
Unknown names fail with the list of installed ones.
"""

from __future__ import annotations

import functools
from importlib.metadata import entry_points

from .errors import ConfigError, UnknownNameError

ENGINE_GROUP = "cloudlab.engines"
BACKEND_GROUP = "cloudlab.backends"
WORKLOAD_GROUP = "cloudlab.workloads"


@functools.cache
def _entry_points(group: str) -> dict:
    return {ep.name: ep for ep in entry_points(group=group)}


def engine_names() -> list[str]:
    return sorted(_entry_points(ENGINE_GROUP))


def backend_names() -> list[str]:
    return sorted(_entry_points(BACKEND_GROUP))


def workload_names() -> list[str]:
    return sorted(_entry_points(WORKLOAD_GROUP))


def _load(group: str, kind: str, name: str, source: str | None):
    eps = _entry_points(group)
    if not isinstance(name, str) or name not in eps:  # (a profile may hold any TOML value)
        error = UnknownNameError(kind, name, eps)
        if source:
            raise ConfigError(f"{source}: {error}") from None
        raise error
    return eps[name].load()


def engine_class(name: str, source: str | None = None):
    return _load(ENGINE_GROUP, "engine", name, source)


def backend_class(name: str, source: str | None = None):
    return _load(BACKEND_GROUP, "backend", name, source)


def workload_module(name: str):
    """The module of workload ``name`` (``run``, ``add_arguments``, ``summary``...)."""
    return _load(WORKLOAD_GROUP, "workload", name, None)

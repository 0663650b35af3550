"""cloudlab: parallel engines (ipyparallel or Dask) from a notebook, here or remote.

>>> import cloudlab
>>> with cloudlab.Cluster(4) as c:            # doctest: +SKIP
...     c.map(abs, range(-3, 3))

In IPython or Jupyter: ``%load_ext cloudlab`` then ``%cluster start 4``.
"""

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: What ``import cloudlab`` offers, and the module each comes from: imported on first use,
#: so that a process that needs one small module (the agent every engine starts under,
#: its lease keeper) does not import them all.
_EXPORTS = {
    **dict.fromkeys(["Cluster", "EngineStatus", "State", "prewarm", "running_clusters"],
                    "cluster"),
    "Death": "deaths",
    "EngineState": "membership",
    **dict.fromkeys(["Cancelled", "CapacityError", "CloudlabError", "ClusterStateError",
                     "ConfigError", "EngineLost", "ProvisionTimeout", "RemoteError",
                     "StartError", "TaskLost", "UnknownNameError"], "errors"),
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:  # a submodule (cloudlab._aio, say), as after an import of it
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError:
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # (what the names above are, for type checkers and editors)
    from .cluster import Cluster, EngineStatus, State, prewarm, running_clusters
    from .deaths import Death
    from .errors import (
        Cancelled,
        CapacityError,
        CloudlabError,
        ClusterStateError,
        ConfigError,
        EngineLost,
        ProvisionTimeout,
        RemoteError,
        StartError,
        TaskLost,
        UnknownNameError,
    )
    from .membership import EngineState

__all__ = [
    "Cluster",
    "EngineStatus",
    "EngineState",
    "State",
    "Death",
    "running_clusters",
    "prewarm",
    "load_ipython_extension",
    "unload_ipython_extension",
    "CloudlabError",
    "ConfigError",
    "UnknownNameError",
    "CapacityError",
    "ClusterStateError",
    "StartError",
    "ProvisionTimeout",
    "RemoteError",
    "TaskLost",
    "EngineLost",
    "Cancelled",
]


def load_ipython_extension(ipython) -> None:
    """``%load_ext cloudlab``: register the %cluster, %push, %pull and %%everywhere magics."""
    from .cluster import prewarm
    from .errors import CloudlabError
    from .magics import register

    register(ipython)
    try:
        prewarm()  # the fork server imports the engine while the user types %cluster start
    except CloudlabError:
        pass  # a broken profile is reported, with its fix, by %cluster start


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext cloudlab``: remove the magics again."""
    from .magics import unregister

    unregister(ipython)

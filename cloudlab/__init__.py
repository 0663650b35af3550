"""cloudlab: parallel engines (ipyparallel or Dask) from a notebook, here or remote.

>>> import cloudlab
>>> with cloudlab.Cluster(4) as c:            # doctest: +SKIP
...     c.map(abs, range(-3, 3))

In IPython or Jupyter: ``%load_ext cloudlab`` then ``%cluster start 4``.
"""

from . import progress as _progress
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
from .widgets import progress as _progress_views

_progress.set_view_factory(_progress_views.auto)  # views observe; the model only reports

__version__ = "0.1.0"

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

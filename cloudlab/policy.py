"""Pure decisions, tested without a cluster: how to chunk a map, how many engines are sane."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from .errors import CapacityError, ConfigError

#: Chunks per engine for ``map``: enough to balance uneven items, few enough to
#: keep per-task overhead (milliseconds on both engines) negligible.
CHUNKS_PER_ENGINE = 4


def choose_chunksize(n_items: int, n_engines: int) -> int:
    """Items per task for ``map`` when the user gave no ``chunksize``."""
    if n_items <= 0:
        return 1
    return max(1, math.ceil(n_items / (max(1, n_engines) * CHUNKS_PER_ENGINE)))


def split(items: list, size: int) -> list[list]:
    """Consecutive slices of ``items`` of length ``size`` (the last may be shorter)."""
    return [items[i:i + size] for i in range(0, len(items), size)]


def partition(items: Sequence, parts: int) -> list:
    """``items`` (a list, an array: anything sliced) cut into ``parts`` contiguous, nearly
    equal slices (for scatter)."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        stop = start + base + (1 if i < extra else 0)
        out.append(items[start:stop])
        start = stop
    return out


def usable_cores() -> int:
    """The cores this process may really use: those it may run on, capped by its container's
    share (Binder's or a hub's "1 CPU" on a host of 32 cores; :mod:`cloudlab.container`)."""
    from .container import share

    return share().cores


def engine_count(value: Any, limit: int, reason: str) -> int:
    """Validate a requested number of engines: a positive whole number that fits."""
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise ConfigError(
                f"The number of engines must be a whole number like 4, not {value!r}."
            ) from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"The number of engines must be a whole number like 4, not {value!r}.")
    if value < 1:
        raise ConfigError(f"The number of engines must be at least 1, not {value}.")
    if value > limit:
        raise CapacityError(value, max(limit, 1), reason)
    return value

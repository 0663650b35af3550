"""Profiles: named TOML files that say which engine runs where, merged with keyword arguments.

A profile is looked up by name in ``$CLOUDLAB_HOME/profiles`` (default
``~/.cloudlab/profiles``) first, then in the repository's ``profiles/``.
Top-level keys are :class:`ClusterOptions`; a table named after the backend
(``[local]``, later ``[ssh]``, ``[ec2]`` ...) holds that backend's own options
dataclass. Each option is declared once, as a dataclass field with its default
and help; validation errors name the file, the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError, UnknownNameError
from .gpus import request as gpu_request

REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"
DEFAULT_PROFILE = "local"


def option(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    """A profile option: its default, its help and, where closed, its allowed values."""
    return field(default=default, metadata={"help": help, "choices": choices})


@dataclass(frozen=True)
class ClusterOptions:
    """What every cluster needs, whatever the backend."""

    engine: str = option("ipyparallel", "Engine kind: what runs (ipyparallel or dask).")
    backend: str = option("local", "Backend: where engines run (local, ...).")
    engines: int = option(4, "Number of engines when none is given (0: one per core this "
                          "machine gives, its CPU quota counted: 1 or 2 on Binder).")
    start_timeout: float = option(120.0, "Seconds to wait for all engines before giving up.")
    replace_dead_engines: bool = option(True, "Start a new engine when one dies.")
    task_retries: int = option(2, "Times a piece of work runs again after its engine died "
                               "under it, before the job fails.")
    heartbeat_timeout: float = option(10.0, "Seconds an engine may go unheard by its "
                                      "controller (SIGSTOP, a frozen VM, a cut link) before "
                                      "it is ended, replaced, and its work run again.")
    memory_limit: str = option("auto", "Memory one engine may hold before it is ended (and "
                               "replaced): like \"2GB\", \"auto\" (the machine's memory "
                               "shared among its engines) or \"none\".")
    gpus: str = option("none", "GPUs to use, one engine on each: \"all\", a count like "
                       "\"2\", or \"none\" (engines on CPU cores).")
    mpi: bool = option(False, "Start the engines together as the ranks of one MPI job "
                       "(mpirun), so code on them shares mpi4py's COMM_WORLD; its size is "
                       "fixed, and a dead rank ends them all. Local and ssh backends.")
    description: str = option("", "One line shown by `cloudlab profiles` and `%cluster list`.")


def cloudlab_home() -> Path:
    """Where user profiles and the record of running clusters live."""
    return Path(os.environ.get("CLOUDLAB_HOME", Path.home() / ".cloudlab"))


def profile_dirs() -> list[Path]:
    return [cloudlab_home() / "profiles", REPO_PROFILES]


def available_profiles() -> dict[str, Path]:
    """Profile name -> file; user profiles shadow repository ones of the same name."""
    found: dict[str, Path] = {}
    for directory in reversed(profile_dirs()):
        if directory.is_dir():
            found.update({p.stem: p for p in sorted(directory.glob("*.toml"))})
    return found


@dataclass(frozen=True)
class Profile:
    """A resolved profile: cluster options plus the backend's own options object."""

    name: str
    source: str
    cluster: ClusterOptions
    backend_options: Any


def load_profile(name: str | None = None, /, **overrides: Any) -> Profile:
    """Read profile ``name`` (default ``local``) and apply keyword ``overrides``.

    Overrides may name a cluster option (``engine="dask"``) or an option of the
    chosen backend (``ip="0.0.0.0"`` for local); anything else is refused.
    """
    from .plugins import backend_class, engine_names

    name = name or DEFAULT_PROFILE
    files = available_profiles()
    if name not in files:
        raise UnknownNameError("profile", name, files)
    path = files[name]
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path} is not valid TOML ({e}); fix the file or remove it.") from e
    return build_profile(name, str(path), data, overrides, backend_class, engine_names)


def build_profile(name, source, data, overrides, backend_class, engine_names) -> Profile:
    """Merge TOML ``data`` with ``overrides`` and validate (pure: no files read)."""
    data = dict(data)
    overrides = {k: v for k, v in overrides.items() if v is not None}
    cluster_keys = {f.name for f in dataclasses.fields(ClusterOptions)}
    backend_name = overrides.get("backend", data.get("backend", ClusterOptions.backend))
    backend_cls = backend_class(backend_name, source=source if "backend" not in overrides else None)
    options_cls = backend_cls.Options
    backend_table = data.pop(backend_cls.name, {}) or {}
    if not isinstance(backend_table, dict):
        raise ConfigError(f"{source}: [{backend_cls.name}] must be a table of options.")
    backend_keys = {f.name for f in dataclasses.fields(options_cls)}
    if "backend" in overrides:  # the profile's table for its own backend does not apply
        data = {k: v for k, v in data.items() if not (isinstance(v, dict) and k == data.get(
            "backend", ClusterOptions.backend))}

    cluster_data = {k: v for k, v in data.items() if k in cluster_keys}
    stray = sorted(set(data) - cluster_keys)
    if stray:
        raise ConfigError(
            f"{source}: unknown key {stray[0]!r}; allowed top-level keys: "
            f"{', '.join(sorted(cluster_keys))} (and a [{backend_cls.name}] table)."
        )
    for key, value in overrides.items():
        if key in cluster_keys:
            cluster_data[key] = value
        elif key in backend_keys:
            backend_table[key] = value
        else:
            raise ConfigError(
                f"Unknown option {key!r}: use one of "
                f"{', '.join(sorted(cluster_keys | backend_keys))}."
            )
    def where(key: str) -> str:
        """Where a bad value came from: the caller's keyword (or flag), or the file."""
        return f"option {key!r}" if key in overrides else f"{source}: key {key!r}"

    if "gpus" in cluster_data:  # "all", 2 (TOML) or "2" (--gpus 2), "none"
        try:
            wanted = gpu_request(cluster_data["gpus"])
        except ValueError as e:
            raise ConfigError(f"{where('gpus')} {e}") from None
        cluster_data["gpus"] = "none" if wanted is None else str(wanted)
    cluster = coerce(ClusterOptions, cluster_data, source, where)
    if cluster.task_retries < 0:
        raise ConfigError(f"{where('task_retries')} must be 0 or more, "
                          f"got {cluster.task_retries}.")
    if not cluster.heartbeat_timeout > 0:  # (NaN too)
        raise ConfigError(f"{where('heartbeat_timeout')} must be a number of seconds "
                          f"above 0, got {cluster.heartbeat_timeout}.")
    try:
        memory_limit_bytes(cluster.memory_limit)
    except ValueError as e:
        raise ConfigError(f"{where('memory_limit')} {e}") from None
    if cluster.engine not in engine_names():
        raise UnknownNameError("engine", cluster.engine, engine_names())
    return Profile(name, source, cluster, coerce(options_cls, backend_table, source, where))


def coerce(cls: type, data: dict[str, Any], source: str, where: Callable[[str], str]) -> Any:
    """Build dataclass ``cls`` from ``data`` (read from ``source``), checking keys, types
    and choices; ``where(key)`` names a bad value's origin."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    values = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"{source}: unknown key {key!r}; allowed: {', '.join(sorted(fields))}."
            )
        values[key] = _check(hints[key], value, where(key), fields[key].metadata.get("choices"))
    return cls(**values)


def _check(hint: Any, value: Any, where: str, choices) -> Any:
    def fail(expected: str):
        raise ConfigError(f"{where} must be {expected}, got {value!r}.")

    if choices and value not in choices:
        fail("one of " + ", ".join(map(repr, choices)))
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in typing.get_args(hint):
            return None
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            fail("true or false")
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            fail("a whole number")
    elif hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            fail("a number")
        value = float(value)
    elif hint is str:
        if not isinstance(value, str):
            fail("a string")
    elif origin in (list, tuple):
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            fail("a list of strings")
        value = tuple(value)
    return value


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
#: Below this an engine cannot even start (an idle one holds about 100 MB).
MIN_MEMORY_LIMIT = 200 * 10**6


def memory_limit_bytes(text: str) -> int | str | None:
    """``"2GB"`` -> 2_000_000_000; ``"auto"`` -> ``"auto"``; ``"none"`` -> None."""
    word = text.strip().lower().replace(" ", "").replace("_", "")
    if word in ("auto", "none"):
        return None if word == "none" else "auto"
    number = word.rstrip("kmgtib")
    unit = word[len(number):]
    try:
        value = float(number) * _UNITS[unit]
        if not math.isfinite(value):
            raise ValueError
    except (ValueError, KeyError):
        raise ValueError(f"must be a size like \"2GB\" or \"512MB\", \"auto\" or \"none\", "
                         f"not {text!r}.") from None
    if value < MIN_MEMORY_LIMIT:
        raise ValueError(f"must be at least 200MB (an idle engine holds about 100 MB), "
                         f"not {text!r}.")
    return int(value)


def describe(cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) for each option of ``cls``: the single source of option docs."""
    return [(f.name, f.default, f.metadata.get("help", "")) for f in dataclasses.fields(cls)]

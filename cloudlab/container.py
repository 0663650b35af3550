"""This process's share of the machine: the cores and memory its container gives it.

A container (Docker, Kubernetes, Binder, a JupyterHub's single-user server) gives a
process a share of a larger machine through its cgroup: cgroup v2's ``cpu.max`` and
``memory.max``, or v1's ``cpu.cfs_quota_us`` over ``cpu.cfs_period_us`` and
``memory.limit_in_bytes``, set on the process's own group or on any group above it.
JupyterHub's spawners say the share in ``CPU_LIMIT`` and ``MEM_LIMIT`` too. The smallest
of them all is the share: the default engine count and the memory guard's default limit
come from it, not from the host's cores and memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil

#: cgroup v1 writes "no limit" as the largest page-aligned number; anything this big is none.
V1_UNLIMITED = 2**62


@dataclass(frozen=True)
class Share:
    cores: int
    memory: int  # bytes
    #: Bytes not in use now: the machine's free memory, or what the container's limit leaves.
    available: int
    #: What sets them, in words: "a cgroup's 1 CPU and 2.0 GiB", "this machine".
    source: str

    @property
    def whose(self) -> str:
        return "this machine" if self.source == "this machine" else "the container"

    @property
    def memory_words(self) -> str:
        """The memory, said with whose it is: "the container's 2.0 GiB"."""
        return f"{self.whose}'s {_gib(self.memory)}"


def share(root: Path = Path("/"), environ: Mapping[str, str] = os.environ) -> Share:
    """The cores and memory this process may use (``root``: where /proc and /sys are)."""
    groups = _groups(root)
    cpus = [*_v2_values(root, groups, "cpu.max", _v2_cpu),
            *_v1_values(root, groups, "cpu", ("cpu.cfs_quota_us", "cpu.cfs_period_us"), _v1_cpu)]
    memory = [*_v2_values(root, groups, "memory.max", _v2_memory),
              *_v1_values(root, groups, "memory", ("memory.limit_in_bytes",), _v1_memory)]
    said = []
    if cpus or memory:
        said.append("a cgroup's " + " and ".join(
            ([_cpus(min(cpus))] if cpus else []) + ([_gib(min(memory))] if memory else [])))
    if _number(environ.get("CPU_LIMIT")):
        cpus.append(float(environ["CPU_LIMIT"]))
        said.append(f"CPU_LIMIT {environ['CPU_LIMIT']}")
    if _number(environ.get("MEM_LIMIT")):
        memory.append(int(float(environ["MEM_LIMIT"])))
        said.append(f"MEM_LIMIT {_gib(memory[-1])}")
    runnable = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                else os.cpu_count()) or 1
    cores = max(1, min([runnable, *(math.ceil(c) for c in cpus)]))
    machine = psutil.virtual_memory()
    total = min([machine.total, *memory])
    available = machine.available
    if total < machine.total:  # a container's limit: what its group uses counts against it
        used = [*_v2_values(root, groups, "memory.current", _v2_memory),
                *_v1_values(root, groups, "memory", ("memory.usage_in_bytes",), _v1_memory)]
        used_here = used[0] if used else machine.total - machine.available
        available = max(0, min(available, total - used_here))
    return Share(cores, total, available, ", ".join(said) or "this machine")


def oom_kills(root: Path = Path("/")) -> int | None:
    """How many processes the kernel's out-of-memory killer has ended in this process's
    group and the groups below it (v2's memory.events, v1's memory.oom_control); None where
    neither says."""
    groups = _groups(root)
    found = (_v2_values(root, groups, "memory.events", _oom_kill)
             or _v1_values(root, groups, "memory", ("memory.oom_control",), _oom_kill))
    return found[0] if found else None  # (the group's own: its count includes those below)


def _groups(root: Path) -> dict[str, str]:
    """This process's group of each v1 controller ("cpu", "memory"), and of v2 (""), by
    /proc/self/cgroup."""
    found: dict[str, str] = {}
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return found
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) == 3:
            for controller in parts[1].split(",") if parts[1] else [""]:
                found[controller] = parts[2]
    return found


def _folders(mount: Path, group: str) -> list[Path]:
    """The group's folder and every one above it, as mounted here. (Inside a container its
    own group is often the mount's root: folders that are not there are skipped.)"""
    parts = [p for p in group.strip("/").split("/") if p]
    return [d for d in (mount.joinpath(*parts[:i]) for i in range(len(parts), -1, -1))
            if d.is_dir()]


def _v2_values(root: Path, groups: dict[str, str], name: str, parse) -> list:
    if "" not in groups:
        return []
    for mount in (root / "sys/fs/cgroup", root / "sys/fs/cgroup/unified"):
        if (mount / "cgroup.controllers").exists():
            return [v for d in _folders(mount, groups[""])
                    if (v := _read(d, (name,), parse)) is not None]
    return []


def _v1_values(root: Path, groups: dict[str, str], controller: str, names: tuple[str, ...],
               parse) -> list:
    group = groups.get(controller)
    if group is None:
        return []
    for mount in (root / "sys/fs/cgroup" / m for m in (controller, "cpu,cpuacct", "cpuacct,cpu")):
        if mount.is_dir():
            return [v for d in _folders(mount, group) if (v := _read(d, names, parse)) is not None]
    return []


def _read(folder: Path, names: tuple[str, ...], parse):
    try:
        return parse(*((folder / n).read_text().split() for n in names))
    except (OSError, ValueError, IndexError):
        return None


def _v2_cpu(words: list[str]) -> float | None:
    return None if words[0] == "max" else int(words[0]) / int(words[1])


def _v1_cpu(quota: list[str], period: list[str]) -> float | None:
    return None if int(quota[0]) < 0 else int(quota[0]) / int(period[0])


def _v2_memory(words: list[str]) -> int | None:
    return None if words[0] == "max" else int(words[0])


def _v1_memory(words: list[str]) -> int | None:
    return None if int(words[0]) >= V1_UNLIMITED else int(words[0])


def _oom_kill(words: list[str]) -> int | None:
    return int(words[words.index("oom_kill") + 1]) if "oom_kill" in words else None


def _number(text: str | None) -> bool:
    try:
        return text is not None and float(text) > 0
    except ValueError:
        return False


def _cpus(count: float) -> str:
    return f"{count:g} CPU" + ("" if count == 1 else "s")


def _gib(size: int) -> str:
    return f"{size / 2**30:.1f} GiB"

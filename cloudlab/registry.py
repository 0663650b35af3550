"""A record of each running cluster on disk, so `cloudlab list` and `cloudlab stop --all`
see clusters owned by other processes (a notebook kernel, a script).

One JSON file per cluster in ``$CLOUDLAB_HOME/clusters``. Records whose owner
died are pruned when read; their processes have already exited (the agent
kills them with their owner), but ``stop_record`` kills any that remain.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil

from .backends.local import cluster_of, group_alive, signal_groups
from .profiles import cloudlab_home


@dataclass
class Record:
    name: str
    engine: str
    backend: str
    owner_pid: int
    owner_started: float
    workdir: str
    engines: int = 0
    pids: list[int] = field(default_factory=list)
    created: float = field(default_factory=time.time)

    @property
    def path(self) -> Path:
        return records_dir() / f"{self.name}.json"

    def save(self) -> None:
        records_dir().mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self)))
        tmp.replace(self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def owner_alive(self) -> bool:
        try:
            return abs(psutil.Process(self.owner_pid).create_time() - self.owner_started) < 1
        except psutil.Error:
            return False


def records_dir() -> Path:
    return cloudlab_home() / "clusters"


def this_process_started() -> float:
    return psutil.Process(os.getpid()).create_time()


def read_records() -> list[Record]:
    """Records of clusters whose owner is alive; stale ones are cleaned away."""
    records = []
    for path in sorted(records_dir().glob("*.json")):
        try:
            record = Record(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            path.unlink(missing_ok=True)
            continue
        if record.owner_alive():
            records.append(record)
        else:
            stop_record(record)
    return records


def stop_record(record: Record, grace: float = 1.0) -> None:
    """Kill a cluster's processes from outside its owner, then forget it."""
    groups = [pid for pid in record.pids if _is_ours(pid, record.name)]
    signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(group_alive(p) for p in groups):
        time.sleep(0.05)
    signal_groups(groups, signal.SIGKILL)
    shutil.rmtree(record.workdir, ignore_errors=True)
    record.remove()


def _is_ours(pid: int, cluster: str) -> bool:
    """Whether ``pid`` still is a process of this cluster (pids get reused)."""
    return cluster_of(pid) == cluster

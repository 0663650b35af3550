"""Why an engine died, in words a user can act on.

An engine's end is classified from what is known about it, best first:

1. its last words: a note the engine wrote just before it ended itself (the
   memory guard in :mod:`cloudlab.onhost.agent` writes one: "out of memory: ...");
2. its exit status: killed by signal N (named: SIGKILL, SIGSEGV, ...), or
   exited with code N;
3. the machine's count of out-of-memory kills (cgroup v2 ``memory.events``):
   a SIGKILL while that count went up is the kernel's OOM killer, not a user.

A :class:`Death` is what the cluster keeps for each engine that ended without
being asked to, and what a lost task's error quotes.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Where cgroup v2 counts the kernel's out-of-memory kills for this process's group.
MEMORY_EVENTS = Path("/sys/fs/cgroup/memory.events")


@dataclass(frozen=True)
class Death:
    """Engine ``engine`` ended at ``at`` (epoch seconds) for ``cause``."""

    engine: int
    cause: str
    at: float = field(default_factory=time.time)
    #: Whether it ended because cloudlab ended it (a cancel), rather than on its own.
    ordered: bool = False

    def __str__(self) -> str:
        return f"engine {self.engine} {self.cause}"


def oom_kills() -> int | None:
    """How many processes the kernel's OOM killer has ended in our cgroup (None: unknown)."""
    try:
        for line in MEMORY_EVENTS.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        pass
    return None


def cause_of(exit_code: int | None, last_words: str | None = None,
             oom_before: int | None = None, oom_now: int | None = None) -> str:
    """One phrase, to follow "engine 3 ...": what ended the engine."""
    if last_words and last_words.strip():
        return last_words.strip().splitlines()[0]
    if exit_code is None:
        return "stopped answering its controller"
    if exit_code < 0:
        number = -exit_code
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        if (number == signal.SIGKILL and oom_before is not None and oom_now is not None
                and oom_now > oom_before):
            return "ran out of memory (killed by the kernel's out-of-memory killer)"
        return f"was killed by signal {number} ({name})"
    return f"exited with code {exit_code}"

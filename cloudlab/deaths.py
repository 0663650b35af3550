"""Why an engine died, in words a user can act on.

An engine's end is classified from what is known about it, best first:

1. its last words: a note the engine wrote just before it ended itself (the
   memory guard in :mod:`cloudlab.onhost.agent` writes one: "out of memory: ...");
2. its exit status: killed by signal N (named: SIGKILL, SIGSEGV, ...), or
   exited with code N;
3. the count of out-of-memory kills in our cgroup (v2's ``memory.events``, v1's
   ``memory.oom_control``: :mod:`cloudlab.container`): a SIGKILL while that count
   went up is the kernel's OOM killer, not a user.

A :class:`Death` is what the cluster keeps for each engine that ended without
being asked to, and what a lost task's error quotes.
"""

from __future__ import annotations

import signal
import time
from dataclasses import dataclass, field


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
    from .container import oom_kills as in_our_group

    return in_our_group()


def cause_of(exit_code: int | None, last_words: str | None = None,
             oom_before: int | None = None, oom_now: int | None = None,
             memory: str | None = None) -> str:
    """One phrase, to follow "engine 3 ...": what ended the engine (``memory``: whose memory
    ran out, "the container's 2.0 GiB")."""
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
            return ("ran out of memory (killed by the kernel's out-of-memory killer"
                    + (f": {memory})" if memory else ")"))
        return f"was killed by signal {number} ({name})"
    return f"exited with code {exit_code}"

"""Errors a user can meet, each one sentence that names the fix.

::

    CloudlabError
    ├── ConfigError            bad argument, profile value or name (ValueError too)
    │   ├── UnknownNameError   an engine, backend or profile that does not exist
    │   └── CapacityError      more engines than this machine can hold
    ├── ClusterStateError      an operation the cluster's state forbids (no cluster, stopped)
    ├── StartError             engines or controller could not start; nothing is left running
    │   └── ProvisionTimeout   too few engines became ready in time
    ├── RemoteError            code raised on engines; collapsed across engines
    ├── TaskLost               a piece of work lost more engines than it may be retried on
    ├── EngineLost             an engine died or went silent during a call on every engine
    └── Cancelled              a job was cancelled; the engines that ran it were replaced

Every error carries the numbers it talks about as attributes, so code can react
without parsing messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class CloudlabError(Exception):
    """Base of every error cloudlab raises on purpose."""

    def _render_traceback_(self) -> list[str]:
        # IPython calls this instead of printing local frames: the message is the point.
        return [f"{type(self).__name__}: {self}"]


class ConfigError(CloudlabError, ValueError):
    """A value given by the user (argument, profile key) is not acceptable."""


class UnknownNameError(ConfigError):
    """A name (engine, backend, profile) that is not installed or defined."""

    def __init__(self, kind: str, name: str, valid: Iterable[str]):
        self.kind, self.name, self.valid = kind, name, sorted(valid)
        super().__init__(
            f"Unknown {kind} {name!r}: use one of {', '.join(self.valid) or '(none installed)'}."
        )


class CapacityError(ConfigError):
    """The machine cannot hold the number of engines asked for."""

    def __init__(self, wanted: int, limit: int, reason: str):
        self.wanted, self.limit, self.reason = wanted, limit, reason
        super().__init__(
            f"Cannot start {wanted} engines here: {reason}; ask for at most {limit}."
        )


class ClusterStateError(CloudlabError, RuntimeError):
    """The cluster is not in a state that allows this operation."""


class StartError(CloudlabError, RuntimeError):
    """A start failed part way; everything it had started has been stopped."""


class ProvisionTimeout(StartError, TimeoutError):
    """Fewer engines than wanted became ready before the timeout."""

    def __init__(self, ready: int, wanted: int, timeout: float,
                 outcome: str = "nothing is left running", hint: str = ""):
        self.ready, self.wanted, self.timeout = ready, wanted, timeout
        super().__init__(
            f"Only {ready} of {wanted} engines were ready after {timeout:g} s; {outcome}. "
            f"{hint or 'Start fewer engines or raise start_timeout in the profile.'}"
        )


class RemoteError(CloudlabError):
    """Code raised on one or more engines.

    Identical failures are collapsed: ``ZeroDivisionError on 16 engines [0-15]``
    followed by one remote traceback, not sixteen.
    """

    def __init__(self, failures: dict[int, tuple[str, str, str]]):
        #: engine id -> (exception type name, message, remote traceback text)
        self.failures = dict(sorted(failures.items()))
        groups: dict[tuple[str, str], list[int]] = {}
        for eid, (ename, evalue, _tb) in self.failures.items():
            groups.setdefault((ename, evalue), []).append(eid)
        self.groups = groups
        lines = []
        for (ename, evalue), ids in groups.items():
            where = f"{len(ids)} engine{'s' if len(ids) > 1 else ''} [{format_ids(ids)}]"
            lines.append(f"{ename}: {evalue} on {where}" if evalue else f"{ename} on {where}")
        first_tb = next(iter(self.failures.values()))[2]
        self.traceback = first_tb
        message = "; ".join(lines)
        if first_tb:
            message += "\n\nRemote traceback (first engine):\n" + first_tb.rstrip()
        super().__init__(message)

    @property
    def engine_ids(self) -> list[int]:
        return list(self.failures)


class TaskLost(CloudlabError, RuntimeError):
    """A piece of a job was running on an engine that died, more times than it is retried.

    ``deaths`` are :class:`~cloudlab.deaths.Death` records, one per engine lost.
    """

    def __init__(self, job: str, piece: str, deaths: list, retries: int):
        self.job, self.piece, self.deaths, self.retries = job, piece, list(deaths), retries
        causes = "; ".join(str(d) for d in deaths)
        fix = ("raise memory_limit in the profile, or give each task less to hold"
               if any("memory" in d.cause for d in deaths) else
               "find what ends the engines (a crash in native code shows as a signal), or "
               "raise task_retries in the profile")
        super().__init__(
            f"{piece} of {job} was lost with {len(deaths)} engine"
            f"{'s' if len(deaths) != 1 else ''} ({causes}) and is not retried again, as "
            f"task_retries is {retries}: {fix}.")


class EngineLost(CloudlabError, RuntimeError):
    """An engine died or stopped answering during a call on several engines (``run``,
    ``execute``, ``push``, ...), which therefore cannot be whole.

    ``deaths``: a :class:`~cloudlab.deaths.Death` for each engine lost; ``results``: what
    the engines that answered returned, by engine id; ``remote_error``: the
    :class:`RemoteError` of those that raised, if any.
    """

    def __init__(self, call: str, deaths: Iterable, results: dict[int, Any],
                 remote_error: RemoteError | None = None):
        self.call, self.deaths, self.results = call, list(deaths), dict(results)
        self.remote_error = remote_error
        lost = "; ".join(str(d) for d in self.deaths)
        answered = sorted([*self.results, *(remote_error.failures if remote_error else ())])
        they = "they" if len(answered) > 1 else "it"
        others = (f"engine{'s' if len(answered) > 1 else ''} {format_ids(answered)} answered "
                  f"(what {they} returned is this error's .results"
                  + (f", what {they} raised its .remote_error" if remote_error else "") + ")"
                  if answered else "no other engine answered")
        super().__init__(f"{call} did not finish on every engine: {lost}; {others}. Run it "
                         f"again on the engines there are now.")


class Cancelled(CloudlabError):
    """A job was cancelled; engines that were running it have been ended and replaced."""

    def __init__(self, job: str, why: str):
        self.job, self.why = job, why
        super().__init__(f"{job} stopped because {why}; the engines that were running it "
                         f"are replaced, and the cluster is ready for the next job.")


def format_ids(ids: Iterable[int]) -> str:
    """Compress engine ids into ranges: [0, 1, 2, 5] -> '0-2,5'."""
    ids = sorted(set(ids))
    parts: list[str] = []
    start = prev = None
    for i in ids:
        if prev is None:  # (so is start)
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            parts.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        parts.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ",".join(parts)

"""Progress of long operations, as the model reports it; views decide how to show it.

``Cluster.map`` opens a :class:`Progress` through :func:`open_progress` in the
caller's thread (so a notebook widget lands in the cell that called it), then
reports from cloudlab's loop as chunks finish. Which view appears (a widget in
Jupyter, a text bar in a terminal, nothing in a pipe) is chosen by the factory
the views registered with :func:`set_view_factory`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

#: Final states.
DONE, FAILED, CANCELLED = "done", "failed", "cancelled"


class Progress:
    """Counts items done out of ``total``; subclasses draw it (throttled)."""

    #: Seconds between two redraws; the final state is always drawn.
    min_interval = 0.1

    def __init__(self, label: str, total: int):
        self.label, self.total = label, total
        self.done = 0
        self.state: str | None = None  # None while running, then DONE, FAILED or CANCELLED
        self.detail = ""
        self.started = time.monotonic()
        self.ended: float | None = None
        self._lock = threading.Lock()
        self._drawn_at = 0.0
        #: Set by the operation while it can be stopped; a view's Stop button calls it.
        self.on_stop: Callable[[], None] | None = None

    def stop(self) -> None:
        """What a Stop button does: ask the operation to stop (it reports CANCELLED)."""
        if self.on_stop is not None and self.state is None:
            self.on_stop()

    # -- what the model calls
    def advance(self, n: int) -> None:
        with self._lock:
            self.done = min(self.total, self.done + n)
            now = time.monotonic()
            if now - self._drawn_at < self.min_interval and self.done < self.total:
                return
            self._drawn_at = now
        self.draw()

    def finish(self, state: str, detail: str = "") -> None:
        with self._lock:
            if self.state is not None:
                return
            self.state, self.detail, self.ended = state, detail, time.monotonic()
        self.draw()

    # -- what views read
    @property
    def elapsed(self) -> float:
        return (self.ended or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        if self.state is not None or not self.done or self.rate <= 0:
            return None
        return (self.total - self.done) / self.rate

    def text(self) -> str:
        """One line: ``map square: 40/100 (40%), 1.2k items/s, ETA 3 s`` or the final state."""
        pct = 100 * self.done // self.total if self.total else 100
        head = f"{self.label}: {self.done:,}/{self.total:,} ({pct}%)"
        if self.state == DONE:
            return f"{head} done in {self.elapsed:.1f} s ({_si(self.rate)} items/s)"
        if self.state == FAILED:
            return f"{head} failed: {self.detail}"
        if self.state == CANCELLED:
            return f"{head} cancelled after {self.elapsed:.1f} s"
        eta = self.eta
        return f"{head}, {_si(self.rate)} items/s, ETA {'?' if eta is None else f'{eta:.0f} s'}"

    def draw(self) -> None:
        """Show the current state; the base class shows nothing."""


def _si(x: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if x >= scale:
            return f"{x / scale:.1f}{unit}"
    return f"{x:.0f}"


_factory: Callable[[str, int], Progress] | None = None


def set_view_factory(factory: Callable[[str, int], Progress] | None) -> None:
    """Register how progress is shown (the views package does this)."""
    global _factory
    _factory = factory


def open_progress(label: str, total: int) -> Progress:
    """A progress for an operation starting now, drawn by the registered view."""
    return (_factory or Progress)(label, total)

"""Engine output in the caller's terminal or cell: each line prefixed by its engine id."""

from __future__ import annotations

import queue
import sys


class PrefixedSink:
    """A sink for ``Cluster.execute``: writes ``[id] line``, joining partial lines.

    Output may arrive in arbitrary fragments ("hel", "lo\\n"); the prefix is
    written only at the start of each line of each engine's stream. Streams are
    looked up at write time so IPython's per-cell capture sees them.
    """

    def __init__(self) -> None:
        self._at_line_start: dict[tuple[int, str], bool] = {}
        self._last: tuple[int, str] | None = None

    def __call__(self, eid: int, stream: str, text: str) -> None:
        out = sys.stderr if stream == "stderr" else sys.stdout
        key = (eid, stream)
        pieces = []
        for line in text.splitlines(keepends=True):
            if self._at_line_start.get(key, True):
                pieces.append(f"[{eid}] ")
            elif self._last != key:  # another engine wrote in between: restart our line
                pieces.append(f"\n[{eid}] ")
            pieces.append(line)
            self._at_line_start[key] = line.endswith("\n")
            self._last = key
        out.write("".join(pieces))
        out.flush()


class CallerQueue:
    """Work for the thread that started an operation: engine output and result callbacks.

    Filled on cloudlab's loop, emptied by the caller (``_aio.run``'s ``drain``).
    In a notebook the caller runs the cell, so output and plot updates land in
    the cell that caused them (a write from the loop thread could land in any cell).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sink = PrefixedSink()

    def output(self, eid: int, stream: str, text: str) -> None:
        """An :data:`~cloudlab.engines.base.OutputSink`: print this in the caller's thread."""
        self._queue.put((self._sink, (eid, stream, text)))

    def call(self, fn, *args) -> None:
        """Call ``fn(*args)`` in the caller's thread."""
        self._queue.put((fn, args))

    def drain(self) -> None:
        while True:
            try:
                fn, args = self._queue.get_nowait()
            except queue.Empty:
                return
            fn(*args)

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


class OutputQueue:
    """Engine output collected on cloudlab's loop, printed by the thread that asked for it.

    In a notebook that thread runs the cell, so output lands in the cell that
    caused it (a write from the loop thread could land in any cell).
    """

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._sink = PrefixedSink()

    def put(self, eid: int, stream: str, text: str) -> None:
        self._queue.put((eid, stream, text))

    def drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            self._sink(*item)

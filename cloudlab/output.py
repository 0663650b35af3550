"""Engine output in the caller's terminal or cell: each line prefixed by its engine id."""

from __future__ import annotations

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

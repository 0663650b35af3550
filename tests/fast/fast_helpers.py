"""What the fast tier's tests share: the in-process kind, and waiting for a condition."""

from __future__ import annotations

import time

#: A cluster of in-process engines (threads of this process): starts in milliseconds.
FAST = {"engine": "inprocess", "backend": "inprocess"}


def until(condition, timeout: float = 5.0) -> None:
    """Until ``condition()`` holds; fails the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)

"""What chaos tests do to processes, and how they wait for recovery."""

from __future__ import annotations

import os
import signal
import time

import pytest


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_for(condition, timeout: float, step: float = 0.01) -> float:
    """Seconds until ``condition()`` held; fails the test after ``timeout``."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            pytest.fail(f"not true after {timeout} s: {condition.__doc__ or condition}")
        time.sleep(step)
    return time.monotonic() - t0


def running(pid: int) -> bool:
    """Whether process ``pid`` exists and has not ended (a zombie has)."""
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False

"""The only bridge between cloudlab's async core and its sync API.

All cluster logic is written once as coroutines and runs on one event loop in a
background daemon thread. Sync methods are one-line twins that call
:func:`run`. A background loop (rather than ``asyncio.run``) is what makes the
sync API work inside Jupyter, whose kernel already runs a loop in the main
thread, and it keeps native clients (the distributed ``Client``) alive between
cells.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

#: Seconds an interrupted call waits for its coroutine's own cleanup (a cloud start
#: deleting its VMs).
CLEANUP_WAIT = 120.0

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_thread: threading.Thread | None = None


def loop() -> asyncio.AbstractEventLoop:
    """The background loop, started on first use."""
    global _loop, _thread
    with _lock:
        if _loop is None or _thread is None or not _thread.is_alive():
            _loop = asyncio.new_event_loop()
            ready = threading.Event()

            def serve() -> None:
                asyncio.set_event_loop(_loop)
                _loop.call_soon(ready.set)
                _loop.run_forever()

            _thread = threading.Thread(target=serve, name="cloudlab-loop", daemon=True)
            _thread.start()
            ready.wait()
        return _loop


def in_loop_thread() -> bool:
    return _thread is not None and threading.current_thread() is _thread


def submit(coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
    """Schedule ``coro`` on the background loop; return a thread-safe future."""
    return asyncio.run_coroutine_threadsafe(coro, loop())


def run(coro: Coroutine[Any, Any, T], drain: Callable[[], None] | None = None) -> T:
    """Run ``coro`` on the background loop and wait for its result.

    ``drain``, if given, is called in this thread every 50 ms while waiting and
    once at the end (to print engine output in the caller's cell). Ctrl-C
    (KeyboardInterrupt) while waiting cancels the coroutine, so an interrupted
    ``c.map`` does not keep running behind the user's back, and waits (up to
    ``CLEANUP_WAIT`` s; a second Ctrl-C stops waiting) for what it does when cancelled:
    an interrupted start deletes what it created before the interpreter may exit.
    """
    if in_loop_thread():
        coro.close()
        raise RuntimeError(
            "A sync cloudlab method was called from cloudlab's own event loop; "
            "await its async twin (the 'a'-prefixed method) instead."
        )
    finished = threading.Event()

    async def tracked() -> T:
        try:
            return await coro
        finally:
            finished.set()

    future = submit(tracked())
    try:
        if drain is None:
            return future.result()
        while True:
            try:
                return future.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                drain()
    except KeyboardInterrupt:
        future.cancel()
        finished.wait(CLEANUP_WAIT)
        raise
    finally:
        if drain is not None:
            drain()


async def to_thread(func, /, *args, **kwargs):
    """Run blocking ``func`` off the loop (process waits, file polls)."""
    return await asyncio.get_running_loop().run_in_executor(
        None, lambda: func(*args, **kwargs)
    )


async def wrap(coro: Coroutine[Any, Any, T]) -> T:
    """Await ``coro`` on cloudlab's loop from whichever loop the caller runs on."""
    if in_loop_thread():
        return await coro
    return await asyncio.wrap_future(submit(coro))


def mark_seen(task: asyncio.Future) -> None:
    """A done callback: mark a background task's error as seen (its consequences are
    reported elsewhere, or nobody needs it), so asyncio does not log it as never retrieved."""
    task.cancelled() or task.exception()


class Signal:
    """Wakes every coroutine waiting on it, each time it is notified."""

    def __init__(self) -> None:
        self._waiters: asyncio.Future | None = None

    def notify(self) -> None:
        if self._waiters is not None and not self._waiters.done():
            self._waiters.set_result(None)
        self._waiters = None

    def wait(self) -> asyncio.Future:
        if self._waiters is None:
            self._waiters = asyncio.get_running_loop().create_future()
        return self._waiters

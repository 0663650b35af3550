"""Zero-copy push to engines on the client's machine: big buffers go once into shared memory.

Pushing a 100 MB array to 16 engines through a controller copies it 16 times
through sockets (seconds). When the engines run on this machine, cloudlab
pickles the value with protocol 5, which hands every large contiguous buffer
(NumPy arrays, bytes-like objects, also inside dicts, lists or DataFrames)
to a callback instead of copying it into the pickle. Those buffers are
written once into an anonymous memory file (``memfd_create``), sealed
against any further change, and each engine maps that file read-only through
``/proc/<client pid>/fd/<fd>`` and unpickles the small remainder against the
mapping: every engine sees the same physical pages, as read-only arrays.

Nothing can leak: the memory file has no name in any file system. It lives as
long as the client keeps its descriptor (until the name is pushed again or
the cluster stops) or an engine keeps a mapping (until it drops the value or
exits), so a killed kernel frees it with its engines.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import pickle
from dataclasses import dataclass
from typing import Any

#: Values whose out-of-band buffers total less than this travel the ordinary way.
MIN_SHARED_BYTES = 1 << 20
_ALIGN = 64  # each buffer starts on a cache line (and any dtype's alignment)


class SharedMemoryUnavailable(OSError):
    """An engine could not map the client's memory (another machine, or no /proc access)."""


@dataclass(frozen=True)
class SharedValue:
    """What travels to engines instead of a value: where its buffers are, and the rest."""

    pid: int
    fd: int
    size: int
    layout: tuple[tuple[int, int], ...]  # (offset, length) of each out-of-band buffer
    pickled: bytes

    def load(self) -> Any:
        """On an engine: the value, its buffers read-only views of the shared memory."""
        try:
            fd = os.open(f"/proc/{self.pid}/fd/{self.fd}", os.O_RDONLY)
        except OSError as e:
            raise SharedMemoryUnavailable(f"cannot map the client's shared memory: {e}") from None
        try:
            memory = mmap.mmap(fd, self.size, mmap.MAP_SHARED, mmap.PROT_READ)
        finally:
            os.close(fd)
        view = memoryview(memory)
        return pickle.loads(self.pickled, buffers=[view[o:o + n] for o, n in self.layout])


class SharedBlock:
    """The client's handle on one value's shared memory; ``close`` lets it go."""

    def __init__(self, pickled: bytes, buffers: list[pickle.PickleBuffer]):
        raws = [b.raw() for b in buffers]
        layout, offset = [], 0
        for raw in raws:
            layout.append((offset, raw.nbytes))
            offset += -(-raw.nbytes // _ALIGN) * _ALIGN
        self.size = max(offset, 1)
        self.fd = os.memfd_create("cloudlab-push", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            for (start, _), raw in zip(layout, raws):
                _write_all(self.fd, raw.cast("B"), start)
            # Sealed: no process, the client included, can change what engines see.
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW
                        | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        except BaseException:
            os.close(self.fd)
            raise
        self.value = SharedValue(os.getpid(), self.fd, self.size, tuple(layout), pickled)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    # pwrite, not a writable mapping: the kernel fills the file's pages directly,
    # twice as fast as faulting them in one by one through a mapping.
    done = 0
    while done < data.nbytes:
        done += os.pwrite(fd, data[done:done + (64 << 20)], offset + done)


def share(value: Any) -> SharedBlock | None:
    """``value`` in shared memory, or None if its buffers are too small to bother."""
    import cloudpickle

    if not hasattr(os, "memfd_create"):  # Linux only: elsewhere values travel the ordinary way
        return None
    buffers: list[pickle.PickleBuffer] = []
    pickled = cloudpickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    if sum(b.raw().nbytes for b in buffers) < MIN_SHARED_BYTES:
        return None
    return SharedBlock(pickled, buffers)

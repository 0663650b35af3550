"""pCT on a GPU: the rows built by CUDA kernels and kept in GPU memory, one CSR per block.

An engine given a GPU (``--gpus``) builds its share's rows with ``kernels/pct_paths.cu``
(the same two passes as :mod:`.system`'s Numba kernels, one thread per history), closes the
gaps between rows on the GPU, and keeps each DROP block as a ``cupyx.scipy.sparse`` CSR
matrix with 32-bit indices. A DROP superstep then sends the engine an image (float32) and
gets one back: the block's two sparse products run on the GPU, where the matrix lives, and
only image-sized vectors cross PCIe.

:func:`build` and :class:`GpuBlock` are written against an array module and its sparse
matrices (CuPy and cupyx here; NumPy and SciPy in the tests, with the same kernels compiled for
the CPU), so the tests run the very code the GPU runs, against the Numba path it replaces.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .cuts import WEPL
from .phantom import Grid

KERNEL_SOURCE = Path(__file__).resolve().parent.parent / "kernels" / "pct_paths.cu"
BATCH = 1 << 18  # histories walked at a time: buffers of about 1.5 GB at 0.5 mm pixels
THREADS = 128
_kernels = None


@dataclass
class GpuBlock:
    """One DROP block's rows on the GPU."""

    matrix: Any  # cupyx.scipy.sparse.csr_matrix, float32, int32 indices
    wepl: Any  # cupy float64
    norms: Any  # cupy float64: squared row norms
    xp: Any = None  # the array module (cupy)

    @property
    def rows(self) -> int:
        return int(self.wepl.size)

    @property
    def nonzeros(self) -> int:
        return int(self.matrix.nnz)

    def crossings(self, pixels: int) -> np.ndarray:
        return _host(self.xp.bincount(self.matrix.indices, minlength=pixels))

    def block_sum(self, x: np.ndarray) -> np.ndarray:
        """sum over rows i of r_i a_i, r_i = (b_i - <a_i, x>) / |a_i|^2 (as share.block_sum)."""
        xp, a = self.xp, self.matrix
        r = (self.wepl - a @ xp.asarray(x, dtype=xp.float32)) / self.norms
        return _host(a.T @ r.astype(xp.float32)).astype(np.float64)


def _host(array) -> np.ndarray:
    return array.get() if hasattr(array, "get") else np.asarray(array)


def _compiled():
    global _kernels
    if _kernels is None:
        import cupy

        module = cupy.RawModule(code=KERNEL_SOURCE.read_text())
        _kernels = module.get_function("count_paths"), module.get_function("fill_paths")
    return _kernels


def compact(bound, lengths, indices, chords, xp=np):
    """Rows written at ``bound[r]`` (``lengths[r]`` pairs each, gaps after them) moved
    together: (indptr of the rows with pairs, indices, chords, their squared norms)."""
    kept = lengths > 0
    starts, counts = bound[:-1][kept], lengths[kept]
    indptr = xp.concatenate([xp.zeros(1, dtype=xp.int64), xp.cumsum(counts)])
    total = int(indptr[-1])
    row = xp.searchsorted(indptr[1:], xp.arange(total), side="right")  # each pair's row
    source = starts[row] + (xp.arange(total) - indptr[:-1][row])
    out_chords = chords[source]
    norms = xp.bincount(row, weights=out_chords.astype(xp.float64) ** 2, minlength=counts.size)
    return indptr.astype(xp.int32), indices[source], out_chords, norms


def build(h: np.ndarray, gid: np.ndarray, hull: np.ndarray, grid: Grid, tracker: float,
          blocks: int, table: np.ndarray, length_step: float, path: str = "mlp",
          xp=None, sparse=None, kernels=None) -> list[GpuBlock]:
    """The rows of histories ``h`` by DROP block, as :func:`.system.build` makes them, on
    this process's GPU (``xp``, ``sparse`` and ``kernels``: CuPy, cupyx.scipy.sparse and the
    compiled CUDA kernels unless given)."""
    from . import system

    if xp is None:
        import cupy
        import cupyx.scipy.sparse

        xp, sparse = cupy, cupyx.scipy.sparse
    if path not in system.PATHS:
        raise ValueError(f"Unknown path {path!r}: choose one of {', '.join(system.PATHS)}.")
    count_paths, fill_paths = kernels or _compiled()
    order = np.argsort(system.block_of(gid, blocks), kind="stable")
    block = system.block_of(gid[order], blocks)
    first = np.searchsorted(block, np.arange(blocks + 1))
    h_all = xp.asarray(np.ascontiguousarray(h[order], dtype=np.float64))
    mask = xp.asarray(np.ascontiguousarray(hull, dtype=np.uint8))
    table_gpu = xp.asarray(np.ascontiguousarray(table, dtype=np.float64))
    step = grid.pixel / system.SAMPLES_PER_PIXEL
    rows = h_all.shape[0]
    geometry = xp.zeros((rows, 6), dtype=xp.float64)
    count_paths((-(-rows // THREADS),), (THREADS,),
                (h_all, np.int64(rows), mask, np.int32(grid.n), np.float64(grid.pixel),
                 np.float64(tracker), np.float64(step), geometry))
    samples = geometry[:, 5].astype(xp.int64)
    pixels = grid.n * grid.n
    out = []
    for t in range(blocks):
        pieces = []
        for a in range(int(first[t]), int(first[t + 1]), BATCH):
            b = min(a + BATCH, int(first[t + 1]))
            bound = xp.concatenate([xp.zeros(1, xp.int64), xp.cumsum(samples[a:b])])
            size = int(bound[-1])
            indices = xp.empty(max(size, 1), dtype=xp.int32)
            chords = xp.empty(max(size, 1), dtype=xp.float32)
            lengths = xp.zeros(b - a, dtype=xp.int64)
            fill_paths((-(-(b - a) // THREADS),), (THREADS,),
                       (h_all[a:b], geometry[a:b], np.int64(b - a), np.int32(grid.n),
                        np.float64(grid.pixel), np.int32(system.PATHS.index(path)), table_gpu,
                        np.int32(table.shape[0]), np.int32(table.shape[1]),
                        np.float64(length_step), bound, indices, chords, lengths))
            indptr, indices, chords, norms = compact(bound, lengths, indices, chords, xp)
            kept = xp.flatnonzero(lengths > 0) + a
            pieces.append((indptr, indices, chords, norms, h_all[kept, WEPL]))
            del bound, lengths
        out.append(_block(pieces, pixels, xp, sparse))
    return out


def _block(pieces: list, pixels: int, xp, sparse) -> GpuBlock:
    if not pieces:
        empty = xp.zeros(0)
        matrix = sparse.csr_matrix((0, pixels), dtype=xp.float32)
        return GpuBlock(matrix, empty, empty, xp)
    offsets = np.cumsum([0] + [int(p[0][-1]) for p in pieces])
    indptr = xp.concatenate([pieces[0][0][:1]] + [p[0][1:] + int(o) for p, o in
                                                     zip(pieces, offsets)]).astype(xp.int32)
    matrix = sparse.csr_matrix(
        (xp.concatenate([p[2] for p in pieces]), xp.concatenate([p[1] for p in pieces]),
         indptr), shape=(indptr.size - 1, pixels))
    return GpuBlock(matrix, xp.concatenate([p[4] for p in pieces]),
                    xp.concatenate([p[3] for p in pieces]), xp)


def available() -> bool:
    """Whether this process can run the GPU path (CuPy and a visible GPU)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False

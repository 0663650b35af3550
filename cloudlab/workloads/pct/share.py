"""The engines' side: the share of histories each engine holds, and what it computes from it.

A reconstruction is a ``run`` (an id). Each engine keeps, per run, the chunks of histories
it simulated, then the ones that passed the cuts, then their rows of the system matrix, and
answers the driver's calls over them: histograms for the cuts, sinogram sums for the FBP,
one block's DROP correction per superstep. Every answer names the chunks it covers, so the
driver can tell that no share was lost (an engine that died takes its share with it).

The same functions run in the client's own process when there is no cluster.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np

from . import cuts, fbp, mlp, simulate, system
from .phantom import Grid, Phantom


@dataclass
class Share:
    chunks: dict[int, np.ndarray] = field(default_factory=dict)  # chunk -> histories
    histories: np.ndarray | None = None  # those that passed the cuts, in global-id order
    gid: np.ndarray | None = None
    blocks: list = field(default_factory=list)  # system.Block, or gpu.GpuBlock on a GPU
    matrices: dict[int, Any] = field(default_factory=dict)  # the CPU blocks' CSR

    def all_histories(self) -> tuple[np.ndarray, np.ndarray]:
        keys = sorted(self.chunks)
        if not keys:
            return np.zeros((0, len(simulate.FIELDS)), np.float32), np.zeros(0, np.int64)
        h = np.concatenate([self.chunks[k] for k in keys])
        gid = np.concatenate([k * simulate.CHUNK + np.arange(len(self.chunks[k]))
                              for k in keys])
        return h, gid


_RUNS: dict[str, Share] = {}


@dataclass(frozen=True)
class Reply:
    chunks: tuple[int, ...]
    value: object


def _reply(run: str, value) -> Reply:
    return Reply(tuple(sorted(_RUNS[run].chunks)), value)


NOTHING = Reply((), None)  # the answer of an engine that holds no share of the run (a newcomer)


def simulate_chunk(run: str, phantom: Phantom, scan: simulate.Scan, seed: int, chunk: int,
                   count: int) -> int:
    """Simulate chunk ``chunk`` here and keep it; returns its size."""
    h = simulate.simulate_chunk(phantom, scan, seed, chunk, count)
    _RUNS.setdefault(run, Share()).chunks[chunk] = h
    return len(h)


def histogram(run: str, binning: cuts.Binning, level: cuts.Level) -> Reply:
    if run not in _RUNS:
        return NOTHING
    h, _ = _RUNS[run].all_histories()
    return _reply(run, cuts.histogram(h, binning, level))


def cut(run: str, binning: cuts.Binning, found: cuts.Cuts) -> Reply:
    """Keep the histories that pass; returns how many did, and how many were usable."""
    if run not in _RUNS:
        return NOTHING
    share = _RUNS[run]
    h, gid = share.all_histories()
    kept = cuts.keep(h, binning, found)
    share.histories, share.gid = h[kept], gid[kept]
    return _reply(run, (int(kept.sum()), int(cuts.usable(h).sum())))


def sinogram(run: str, geometry: fbp.Sinogram) -> Reply:
    if run not in _RUNS:
        return NOTHING
    histories = _RUNS[run].histories
    assert histories is not None  # kept by cut, which comes first
    return _reply(run, fbp.sinogram_sums(histories, geometry))


@lru_cache(maxsize=4)
def mlp_table(length_step: float, max_length: float) -> np.ndarray:
    return mlp.build_table(max_length=max_length, length_step=length_step)


def build_rows(run: str, hull: np.ndarray, grid: Grid, tracker: float, blocks: int,
               path: str = "mlp", device: str = "cpu") -> Reply:
    """This share's rows, by block (in GPU memory with ``device="gpu"``); returns per block
    how many rows cross each pixel, and the rows and nonzeros kept."""
    if run not in _RUNS:
        return NOTHING
    share = _RUNS[run]
    assert share.histories is not None and share.gid is not None  # kept by cut, which comes first
    table = mlp_table(mlp.TABLE_STEP, mlp.table_length(grid.size))
    build: Callable[..., list] = system.build
    if device == "gpu":
        from . import gpu

        build = gpu.build
    share.blocks = build(share.histories, share.gid, hull, grid, tracker, blocks, table,
                         mlp.TABLE_STEP, path)
    if device != "gpu":
        share.matrices = {t: b.matrix(grid.n * grid.n) for t, b in enumerate(share.blocks)}
    crossings = np.stack([b.crossings(grid.n * grid.n) for b in share.blocks]).astype(np.int32)
    rows = sum(b.rows for b in share.blocks)
    nonzeros = sum(b.nonzeros for b in share.blocks)
    return _reply(run, (crossings, rows, nonzeros))


def block_sum(run: str, t: int, x: np.ndarray) -> Reply:
    """sum over this share's rows i of block t of r_i a_i, r_i = (b_i - <a_i, x>) / |a_i|^2."""
    if run not in _RUNS:
        return NOTHING
    share = _RUNS[run]
    if t not in share.matrices:  # a GPU block: the products run where its matrix is
        return _reply(run, share.blocks[t].block_sum(x))
    a, block = share.matrices[t], share.blocks[t]
    # In float32, like the chords: a float64 vector would make SciPy copy the block to
    # float64 on every product (1.8x slower). The sum over engines is in float64.
    r = (block.wepl - a @ x.astype(np.float32)) / block.norms
    return _reply(run, (a.T @ r.astype(np.float32)).astype(np.float64))


def forget(run: str) -> None:
    _RUNS.pop(run, None)


def process_peak_memory() -> int:
    """This process's peak resident memory (bytes) so far."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_memory(run: str) -> Reply:
    if run not in _RUNS:
        return NOTHING
    return _reply(run, process_peak_memory())


def warm_up(device: str = "cpu") -> None:
    """Compile (or load from Numba's cache) every kernel on a tiny input; on a GPU, its
    CUDA kernels too."""
    from .phantom import ctp404

    phantom = ctp404()
    grid = Grid(8, 2.0)
    scan = simulate.Scan.around(phantom, 16.0)
    h = simulate.simulate_chunk(phantom, scan, 0, 0, 16).astype(np.float64)
    hull = np.ones((grid.n, grid.n), bool)
    table = mlp_table(mlp.TABLE_STEP, mlp.table_length(grid.size))
    # One build compiles the kernels of every path model (the model is an argument).
    system.build(h, np.arange(len(h)), hull, grid, scan.tracker, 2, table, mlp.TABLE_STEP)
    if device == "gpu":
        from . import gpu

        gpu.build(h, np.arange(len(h)), hull, grid, scan.tracker, 2, table, mlp.TABLE_STEP)

"""The system matrix: each history's row of chord lengths along its most likely path (the
"MLP cache"), built once and kept by the engine that holds the history.

Outside the hull a proton flies straight, so its path is the tracker line up to the hull
entry (``u0``) and from the hull exit (``u2``); between them it is the MLP, sampled every
half pixel at depths d_k = (k + 1/2) L / n. Each sample adds (L / n) sqrt(1 + tan^2 theta)
to its pixel; consecutive samples in one pixel merge. Two passes over the histories in
Numba (count the samples, then fill and merge) avoid the index arithmetic over 10^9 entries
that exhausted memory in NumPy (docs/pct.md section 9).

Rows are grouped into the global DROP blocks: a history's block is a hash of its global id,
so every engine count cuts the same blocks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import mlp
from .cuts import PHI, T_IN, T_OUT, THETA_IN, THETA_OUT, WEPL
from .phantom import Grid

#: Paths a row can follow inside the hull: the most likely path (tabulated), the cubic
#: spline of Collins-Fekete et al. 2015, or the straight chord between hull entry and exit.
PATHS = ("mlp", "spline", "straight")
MLP, SPLINE, STRAIGHT = range(3)
BATCH = 1 << 16  # histories whose paths are walked at a time
SAMPLES_PER_PIXEL = 2  # MLP samples per pixel of depth (the pCT code's MLP_U_STEP = voxel / 2)
MIX1, MIX2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


@dataclass
class Block:
    """The rows of one DROP block that one share holds, as CSR with 32-bit indices."""

    indptr: np.ndarray  # int32 (rows + 1): 32-bit like the indices, so scipy copies neither
    indices: np.ndarray  # int32 pixel ids
    chords: np.ndarray  # float32 cm
    wepl: np.ndarray  # float64 cm
    norms: np.ndarray  # float64: squared row norms

    @property
    def rows(self) -> int:
        return self.wepl.size

    @property
    def nonzeros(self) -> int:
        return self.indices.size

    def matrix(self, pixels: int):
        from scipy.sparse import csr_matrix

        return csr_matrix((self.chords, self.indices, self.indptr), shape=(self.rows, pixels))

    def crossings(self, pixels: int) -> np.ndarray:
        """How many of these rows cross each pixel (DROP's per-block step scaling)."""
        return np.bincount(self.indices, minlength=pixels)


def block_of(gid: np.ndarray, blocks: int) -> np.ndarray:
    """A history's DROP block: SplitMix64 of its global id, modulo ``blocks``."""
    z = gid.astype(np.uint64) + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * MIX1
    z = (z ^ (z >> np.uint64(27))) * MIX2
    z = z ^ (z >> np.uint64(31))
    return (z % np.uint64(blocks)).astype(np.int64)


def build(h: np.ndarray, gid: np.ndarray, hull: np.ndarray, grid: Grid, tracker: float,
          blocks: int, table: np.ndarray, length_step: float, path: str = "mlp") -> list[Block]:
    """The rows of histories ``h`` (global ids ``gid``), grouped into ``blocks`` blocks, along
    ``path`` (one of PATHS); histories whose entry line misses the hull have no row."""
    if path not in PATHS:
        raise ValueError(f"Unknown path {path!r}: choose one of {', '.join(PATHS)}.")
    order = np.argsort(block_of(gid, blocks), kind="stable")
    h = np.ascontiguousarray(h[order], dtype=np.float64)
    block = block_of(gid[order], blocks)
    mask = np.ascontiguousarray(hull, dtype=np.bool_)
    kernel_count, kernel_fill, kernel_compact = _kernels()
    geometry = np.empty((h.shape[0], 6))  # u0, t0, u2, t2, L, samples (0: no row)
    step = grid.pixel / SAMPLES_PER_PIXEL
    kernel_count(h, mask, grid.n, grid.pixel, tracker, step, geometry)
    samples = geometry[:, 5].astype(np.int64)
    lengths = np.zeros(h.shape[0], dtype=np.int64)
    norms = np.zeros(h.shape[0])
    first = np.searchsorted(block, np.arange(blocks + 1))  # rows are in block order
    out = []
    for t in range(blocks):
        # A block's paths are walked a batch at a time into buffers sized for the batch's
        # samples, then compacted (merged samples take about half the room): memory stays
        # near the rows' own size, not twice it.
        pieces = []
        for a in range(first[t], first[t + 1], BATCH):
            b = min(a + BATCH, first[t + 1])
            bound = np.concatenate([[0], np.cumsum(samples[a:b])])
            batch_indices = np.empty(bound[-1], dtype=np.int32)
            batch_chords = np.empty(bound[-1], dtype=np.float32)
            kernel_fill(h[a:b], geometry[a:b], grid.n, grid.pixel, PATHS.index(path), table,
                        length_step, bound, batch_indices, batch_chords, lengths[a:b])
            k = kernel_compact(bound, lengths[a:b], batch_indices, batch_chords, norms[a:b])
            pieces.append((batch_indices[:k].copy(), batch_chords[:k].copy()))
        rows = np.arange(first[t], first[t + 1])[lengths[first[t]:first[t + 1]] > 0]
        indptr = np.concatenate([[0], np.cumsum(lengths[rows])]).astype(np.int32)
        indices = np.concatenate([p[0] for p in pieces] or [np.zeros(0, np.int32)])
        chords = np.concatenate([p[1] for p in pieces] or [np.zeros(0, np.float32)])
        out.append(Block(indptr, indices, chords, h[rows, WEPL].copy(), norms[rows]))
    return out


# ----------------------------------------------------------------- compiled passes
def _in_hull(mask, n, pixel, u, t, cos, sin):
    x, y = u * cos - t * sin, u * sin + t * cos
    j, i = int(math.floor(x / pixel + n / 2)), int(math.floor(y / pixel + n / 2))
    return 0 <= i < n and 0 <= j < n and mask[i, j]


def _count(h, mask, n, pixel, tracker, step, geometry):
    """Pass 1: hull entry and exit of each history and an upper bound of its samples."""
    reach = n * pixel / math.sqrt(2.0) + step
    for r in range(h.shape[0]):
        cos, sin = math.cos(h[r, PHI]), math.sin(h[r, PHI])
        t_in, tan_in = h[r, T_IN], math.tan(h[r, THETA_IN])
        t_out, tan_out = h[r, T_OUT], math.tan(h[r, THETA_OUT])
        geometry[r, 5] = 0.0
        u0 = -reach
        while u0 < reach and not _in_hull(mask, n, pixel, u0, t_in + (u0 + tracker) * tan_in,
                                          cos, sin):
            u0 += step
        if u0 >= reach:
            continue  # misses the hull
        u2 = reach
        while u2 > u0 and not _in_hull(mask, n, pixel, u2, t_out - (tracker - u2) * tan_out,
                                       cos, sin):
            u2 -= step
        u0, u2 = u0 - step / 2, u2 + step / 2  # the crossings lie between samples
        geometry[r, 0] = u0
        geometry[r, 1] = t_in + (u0 + tracker) * tan_in
        geometry[r, 2] = u2
        geometry[r, 3] = t_out - (tracker - u2) * tan_out
        geometry[r, 4] = u2 - u0
        geometry[r, 5] = math.ceil((u2 - u0) / step)


def _fill(h, geometry, n, pixel, kind, table, length_step, bound, indices, chords, lengths):
    """Pass 2: walk each path (PATHS[kind]), writing (pixel, chord) pairs, merging repeats."""
    for r in range(h.shape[0]):
        samples = int(geometry[r, 5])
        if samples == 0:
            continue
        cos, sin = math.cos(h[r, PHI]), math.sin(h[r, PHI])
        u0, t0, length, t2 = geometry[r, 0], geometry[r, 1], geometry[r, 4], geometry[r, 3]
        th0, th2 = h[r, THETA_IN], h[r, THETA_OUT]
        # The spline's end tangents, scaled as Collins-Fekete et al. 2015 fitted them.
        chord_length = math.sqrt(length**2 + (t2 - t0) ** 2)
        ratio = (h[r, WEPL] / mlp.WER) ** 2
        scale0, scale2 = (1.01 + 0.43 * ratio) * chord_length, (0.99 - 0.46 * ratio) * chord_length
        c0, s0 = math.cos(th0), math.sin(th0)
        c2, s2 = math.cos(th2), math.sin(th2)
        step = length / samples
        k, last = bound[r], -1
        for sample in range(samples):
            f = (sample + 0.5) / samples
            if kind == MLP:
                d = f * length
                t, theta = mlp.table_mlp(table, length_step, length, f, t0, th0, t2, th2)
                u = u0 + d
                chord = step * math.sqrt(1.0 + math.tan(theta) ** 2)
            elif kind == SPLINE:
                # Sampled at the same depths as the MLP: solve u(s) = u0 + d for s (Newton).
                target, q = f * length, f
                for _ in range(3):
                    du = (6*q**2 - 6*q) * u0 + (3*q**2 - 4*q + 1) * scale0 * c0 \
                        + (-6*q**2 + 6*q) * (u0 + length) + (3*q**2 - 2*q) * scale2 * c2
                    uq = (2*q**3 - 3*q**2 + 1) * u0 + (q**3 - 2*q**2 + q) * scale0 * c0 \
                        + (-2*q**3 + 3*q**2) * (u0 + length) + (q**3 - q**2) * scale2 * c2
                    q = min(max(q - (uq - u0 - target) / du, 0.0), 1.0)
                u = u0 + target
                t = (2*q**3 - 3*q**2 + 1) * t0 + (q**3 - 2*q**2 + q) * scale0 * s0 \
                    + (-2*q**3 + 3*q**2) * t2 + (q**3 - q**2) * scale2 * s2
                dt = (6*q**2 - 6*q) * t0 + (3*q**2 - 4*q + 1) * scale0 * s0 \
                    + (-6*q**2 + 6*q) * t2 + (3*q**2 - 2*q) * scale2 * s2
                chord = step * math.sqrt(1.0 + (dt / du) ** 2)
            else:  # the straight chord from hull entry to hull exit
                u = u0 + f * length
                t = t0 + f * (t2 - t0)
                chord = chord_length / samples
            x, y = u * cos - t * sin, u * sin + t * cos
            j, i = int(math.floor(x / pixel + n / 2)), int(math.floor(y / pixel + n / 2))
            if not (0 <= i < n and 0 <= j < n):
                continue
            pixel_id = i * n + j
            if pixel_id == last:
                chords[k - 1] += chord
            else:
                indices[k] = pixel_id
                chords[k] = chord
                k += 1
                last = pixel_id
        lengths[r] = k - bound[r]


def _compact(bound, lengths, indices, chords, norms):
    """Pass 3: close the gaps between rows in place (each row moves left), and take each
    row's squared norm on the way; the total."""
    k = 0
    for r in range(lengths.size):
        start = bound[r]
        square = 0.0
        for e in range(lengths[r]):
            indices[k + e] = indices[start + e]
            chords[k + e] = chords[start + e]
            square += float(chords[start + e]) ** 2
        norms[r] = square
        k += lengths[r]
    return k


_compiled = None


def _kernels():
    global _compiled
    if _compiled is None:
        import numba
        from numba.extending import register_jitable

        register_jitable(_in_hull)
        _compiled = tuple(numba.njit(cache=True, nogil=True)(f) for f in (_count, _fill, _compact))
    return _compiled

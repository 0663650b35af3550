"""The first image: filtered backprojection of straight-line-binned WEPL, and the hull.

Each history adds its WEPL to the sinogram bin of its straight chord: angle ``phi`` and
``t_c = (t_in + t_out) / 2``, the chord's offset at u = 0 (trackers symmetric about the
axis); angles past 180 degrees fold back with ``t_c -> -t_c``. Sums and counts add up across
engines; the mean per bin is the projection. The filter is the spatial Shepp-Logan kernel,
whose DC term is right (a sampled ramp with DC = 0 biased the RSP by -2%, PCT.md section 3).

The hull (where the object is) is the 3x3-smoothed FBP above RSP 0.5, dilated by a pixel:
iterations update only inside it, and paths are straight outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .cuts import PHI, T_IN, T_OUT, WEPL
from .phantom import Grid


@dataclass(frozen=True)
class Sinogram:
    """Bins of the straight-line sinogram: ``angles`` over 180 degrees by ``grid.n`` offsets
    of one pixel, covering the grid."""

    grid: Grid
    angles: int

    @classmethod
    def for_grid(cls, grid: Grid) -> Sinogram:
        return cls(grid, max(180, round(1.5 * grid.n)))

    @property
    def shape(self) -> tuple[int, int]:
        return self.angles, self.grid.n

    def phis(self) -> np.ndarray:
        return (np.arange(self.angles) + 0.5) * math.pi / self.angles


def sinogram_sums(h: np.ndarray, sinogram: Sinogram) -> np.ndarray:
    """``(2, angles, n)``: WEPL sums and counts of this share of histories per bin."""
    phi = h[:, PHI].astype(np.float64) % (2 * math.pi)
    t = (h[:, T_IN].astype(np.float64) + h[:, T_OUT]) / 2
    back = phi >= math.pi
    phi = np.where(back, phi - math.pi, phi)
    t = np.where(back, -t, t)
    grid = sinogram.grid
    a = np.minimum((phi / math.pi * sinogram.angles).astype(np.int64), sinogram.angles - 1)
    k = np.floor(t / grid.pixel + grid.n / 2).astype(np.int64)
    inside = (k >= 0) & (k < grid.n)
    index = a[inside] * grid.n + k[inside]
    size = sinogram.angles * grid.n
    sums = np.bincount(index, weights=h[inside, WEPL].astype(np.float64), minlength=size)
    counts = np.bincount(index, minlength=size).astype(np.float64)
    return np.stack([sums, counts]).reshape(2, *sinogram.shape)


def projections(sums: np.ndarray) -> np.ndarray:
    """Mean WEPL per bin; empty bins interpolated along the offset (zero beyond the ends)."""
    total, count = sums
    mean = np.divide(total, count, out=np.zeros_like(total), where=count > 0)
    for row, n in zip(mean, count):
        filled = n > 0
        if filled.any() and not filled.all():
            k = np.arange(row.size)
            row[~filled] = np.interp(k[~filled], k[filled], row[filled], left=0.0, right=0.0)
    return mean


def shepp_logan_filter(p: np.ndarray, step: float) -> np.ndarray:
    """Each row of ``p`` convolved with h(k) = -2 / (pi^2 step^2 (4k^2 - 1)), times ``step``:
    by FFT, zero-padded so that the convolution is linear, not circular."""
    n = p.shape[-1]
    size = 1 << math.ceil(math.log2(2 * n))
    k = np.arange(size)
    k = np.where(k < size // 2, k, k - size)
    kernel = -2.0 / (math.pi**2 * step**2 * (4.0 * k**2 - 1.0))
    spectrum = np.fft.rfft(p, size, axis=-1) * np.fft.rfft(kernel)
    return step * np.fft.irfft(spectrum, size, axis=-1)[..., :n]


def backproject(q: np.ndarray, sinogram: Sinogram) -> np.ndarray:
    """x(x, y) = (pi / N) sum over angles of q(t = -x sin phi + y cos phi), linear in t."""
    grid = sinogram.grid
    x, y = grid.xy()
    image = np.zeros((grid.n, grid.n))
    offsets = np.arange(grid.n)
    for phi, row in zip(sinogram.phis(), q):
        t = -x * math.sin(phi) + y * math.cos(phi)
        image += np.interp(t / grid.pixel + (grid.n - 1) / 2, offsets, row, left=0.0, right=0.0)
    return image * math.pi / sinogram.angles


def reconstruct(sums: np.ndarray, sinogram: Sinogram) -> np.ndarray:
    """The FBP image (RSP) from summed ``sinogram_sums``."""
    q = shepp_logan_filter(projections(sums), sinogram.grid.pixel)
    return backproject(q, sinogram)


def hull(image: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Where the object is: the 3x3 mean of ``image`` above ``threshold``, with its holes
    filled (air inserts are inside the object, and their RSP is to be found), dilated by one
    pixel (8-neighbours) so that it holds every pixel a hull-clipped path touches."""
    from scipy import ndimage

    smooth = ndimage.uniform_filter(image, size=3, mode="constant")
    inside = ndimage.binary_fill_holes(smooth > threshold)
    return ndimage.binary_dilation(inside, structure=np.ones((3, 3), bool))

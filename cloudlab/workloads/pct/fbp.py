"""The first image: filtered backprojection of straight-line-binned WEPL, and the hull.

Each history adds its WEPL to the sinogram bin of its straight chord: the line through the
points where its entry and exit tracks (extrapolated straight from the trackers) cross the
edge of the scanned circle. Its angle is the gantry angle plus the chord's tilt, its offset
the chord's distance from the axis; angles past 180 degrees fold back with the offset
negated. Binning at the gantry angle and the mid-tracker offset instead ignores the tilt
that scattering gives the chord: at the small size that blurred the Teflon edge from 2.7 to
3.8 mm and biased the inserts by up to 2%. Sums and counts add up across engines; the mean
per bin is the projection. The filter is the spatial Shepp-Logan kernel, whose DC term is
right (a sampled ramp with DC = 0 biased the RSP by -2%, docs/pct.md section 3).

The hull (where the object is) is the 3x3-smoothed FBP above RSP 0.5, holes filled,
dilated by a pixel: iterations update only inside it, and paths are straight outside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .cuts import PHI, T_IN, T_OUT, THETA_IN, THETA_OUT, WEPL
from .phantom import Grid


@dataclass(frozen=True)
class Sinogram:
    """Bins of the straight-line sinogram: ``angles`` over 180 degrees by ``grid.n`` offsets
    of one pixel, covering the grid; trackers at u = -tracker and u = +tracker."""

    grid: Grid
    angles: int
    tracker: float

    @classmethod
    def for_grid(cls, grid: Grid, tracker: float) -> Sinogram:
        return cls(grid, max(180, round(1.5 * grid.n)), tracker)

    @property
    def shape(self) -> tuple[int, int]:
        return self.angles, self.grid.n

    def phis(self) -> np.ndarray:
        return (np.arange(self.angles) + 0.5) * math.pi / self.angles


def chords(h: np.ndarray, sinogram: Sinogram) -> tuple[np.ndarray, np.ndarray]:
    """Each history's straight chord across the scanned circle: (angle, offset)."""
    radius = sinogram.grid.size / 2
    flight = sinogram.tracker - radius
    h = h.astype(np.float64)
    t_a = h[:, T_IN] + flight * np.tan(h[:, THETA_IN])
    t_b = h[:, T_OUT] - flight * np.tan(h[:, THETA_OUT])
    tilt = np.arctan((t_b - t_a) / (2 * radius))
    return h[:, PHI] + tilt, (t_a + t_b) / 2 * np.cos(tilt)


def sinogram_sums(h: np.ndarray, sinogram: Sinogram) -> np.ndarray:
    """``(2, angles, n)``: WEPL sums and counts of this share of histories per bin."""
    phi, t = chords(h, sinogram)
    phi = phi % (2 * math.pi)
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

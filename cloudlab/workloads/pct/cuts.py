"""Data cuts: drop histories whose WEPL or angle change is more than 3 sigma from their bin's.

Bins are 4 degrees of gantry angle by 1 mm of entry position. Centre and sigma are robust
(median and 1.4826 MAD, floored at 1 mm and 1 mrad): mean and standard deviation let
nuclear-like outliers through and bias the RSP (docs/pct.md section 2).

Medians do not add up across engines, histograms do. So each statistic is found by
refinement: a 64-level histogram per bin over a fixed range locates the level holding the
median, a second one inside that level locates it to 1/4096 of the range. Every engine
histograms its own histories, the counts are summed, and the cuts are the same integers
whatever the engine count. ``robust_cuts`` takes that sum as a function, so it runs alike on
one array and on a cluster.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .mlp import WER
from .simulate import FIELDS

PHI, T_IN, THETA_IN, T_OUT, THETA_OUT, WEPL = range(len(FIELDS))
LEVELS = 64  # histogram levels per refinement
SIGMAS = 3.0
MAD_TO_SIGMA = 1.4826
FLOORS = np.array([0.1, 0.001])  # cm, rad: smallest sigma of WEPL and of the angle change
SPANS = np.array([[0.0, WER], [-0.25, 0.25]])  # where WEPL and the angle change can lie
SPREAD_SPANS = np.array([[0.0, 5.0], [0.0, 0.1]])  # where |value - median| can lie


@dataclass(frozen=True)
class Binning:
    fov: float
    angle_bins: int = 90  # 4 degrees
    t_step: float = 0.1  # cm

    @property
    def t_bins(self) -> int:
        return math.ceil(self.fov / self.t_step - 1e-9)

    @property
    def size(self) -> int:
        return self.angle_bins * self.t_bins

    def index(self, h: np.ndarray) -> np.ndarray:
        a = np.floor(h[:, PHI] / (2 * math.pi) * self.angle_bins).astype(np.int64) % self.angle_bins
        t = np.clip(np.floor((h[:, T_IN] + self.fov / 2) / self.t_step).astype(np.int64),
                    0, self.t_bins - 1)
        return a * self.t_bins + t


@dataclass(frozen=True)
class Level:
    """One histogram to take: of the values (``centre`` None) or of their distance from
    their bin's ``centre``, from ``low`` in LEVELS steps of ``width`` (per quantity and
    bin: arrays ``(2, bins)``); with ``clip``, values outside fall in the end levels."""

    low: np.ndarray
    width: np.ndarray
    clip: bool
    centre: np.ndarray | None = None


@dataclass(frozen=True)
class Cuts:
    centre: np.ndarray  # (2, bins): median WEPL and angle change
    sigma: np.ndarray  # (2, bins)
    histories: np.ndarray  # (bins,): how many usable histories each bin had


def usable(h: np.ndarray) -> np.ndarray:
    """Histories that can be cut at all: finite, WEPL within the protons' range."""
    return np.isfinite(h).all(axis=1) & (h[:, WEPL] >= 0) & (h[:, WEPL] < WER)


def quantities(h: np.ndarray) -> np.ndarray:
    """``(2, n)``: WEPL and angle change theta_out - theta_in."""
    return np.stack([h[:, WEPL], h[:, THETA_OUT] - h[:, THETA_IN]]).astype(np.float64)


def histogram(h: np.ndarray, binning: Binning, level: Level) -> np.ndarray:
    """``(2, bins, LEVELS)`` counts of this share of histories (usable ones only)."""
    h = h[usable(h)]
    bins = binning.index(h)
    values = quantities(h)
    if level.centre is not None:
        values = np.abs(values - level.centre[:, bins])
    k = np.floor((values - level.low[:, bins]) / level.width[:, bins]).astype(np.int64)
    counts = np.zeros((2, binning.size * LEVELS), dtype=np.int64)
    for q in range(2):
        if level.clip:
            kq, bq = np.clip(k[q], 0, LEVELS - 1), bins
        else:
            inside = (k[q] >= 0) & (k[q] < LEVELS)
            kq, bq = k[q][inside], bins[inside]
        counts[q] = np.bincount(bq * LEVELS + kq, minlength=binning.size * LEVELS)
    return counts.reshape(2, binning.size, LEVELS).astype(np.int32)


def robust_cuts(binning: Binning, total: Callable[[Level], np.ndarray]) -> Cuts:
    """Per-bin medians and sigmas; ``total(level)`` is ``histogram`` summed over all histories."""
    centre, n = _median(binning, total, SPANS, None)
    spread, _ = _median(binning, total, SPREAD_SPANS, centre)
    sigma = np.maximum(MAD_TO_SIGMA * spread, FLOORS[:, None])
    return Cuts(centre, sigma, n)


def keep(h: np.ndarray, binning: Binning, cuts: Cuts) -> np.ndarray:
    """Which histories of this share pass: usable and within SIGMAS of their bin's centre."""
    ok = usable(h)
    bins = binning.index(h)
    values = quantities(h)
    within = np.abs(values - cuts.centre[:, bins]) <= SIGMAS * cuts.sigma[:, bins]
    return ok & within.all(axis=0)


def _median(binning: Binning, total, spans: np.ndarray, centre) -> tuple[np.ndarray, np.ndarray]:
    """Each bin's median of the values (or of their distance from ``centre``), to 1/LEVELS^2
    of the span; NaN where a bin is empty."""
    shape = (2, binning.size)
    low = np.broadcast_to(spans[:, :1], shape).copy()
    width = np.broadcast_to((spans[:, 1:] - spans[:, :1]) / LEVELS, shape).copy()
    coarse = total(Level(low, width, True, centre))
    n = coarse.sum(axis=2)
    rank = np.maximum(n - 1, 0) // 2  # the lower median's rank
    k, below = _locate(coarse, rank)
    low = low + k * width
    width = width / LEVELS
    fine = total(Level(low, width, False, centre))
    k2, below2 = _locate(fine, rank - below)
    in_level = np.take_along_axis(fine, k2[..., None], axis=2)[..., 0]
    # Spread the level's values evenly across it: the median falls at its rank among them.
    fraction = (rank - below - below2 + 0.5) / np.maximum(in_level, 1)
    median = low + (k2 + fraction) * width
    return np.where(n > 0, median, np.nan), n[0]


def _locate(counts: np.ndarray, rank: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The level holding the value of rank ``rank`` (0-based), and how many lie below it."""
    cumulative = np.cumsum(counts, axis=2)
    k = (cumulative <= rank[..., None]).sum(axis=2)
    k = np.minimum(k, LEVELS - 1)
    below = np.where(k > 0, np.take_along_axis(cumulative, np.maximum(k - 1, 0)[..., None],
                                                axis=2)[..., 0], 0)
    return k, below

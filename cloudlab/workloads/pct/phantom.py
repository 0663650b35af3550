"""Phantoms: relative stopping power (RSP) maps to simulate protons through and to score
reconstructions against.

A phantom is a list of ellipses, each either setting the RSP inside it (the CTP404's
cylinder and inserts) or adding to it (Shepp-Logan's overlapping ellipses), in order, over
vacuum. The shapes are analytic, so the simulator samples the true RSP at any point and the
scores compare with exact insert values; ``raster`` renders them on the reconstruction grid
(averaged over sub-pixels) for the RMSE. Lengths are in cm, angles in radians.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

SET, ADD = 0.0, 1.0
#: Columns of ``Phantom.shapes``.
CX, CY, A, B, ANGLE, VALUE, MODE = range(7)


@dataclass(frozen=True)
class Grid:
    """``n`` x ``n`` square pixels of ``pixel`` cm centred on the rotation axis; image
    ``[i, j]`` is at x = (j - (n-1)/2) * pixel, y = (i - (n-1)/2) * pixel (row 0 at the
    bottom, as ``imshow(origin="lower")`` draws it)."""

    n: int
    pixel: float

    @property
    def size(self) -> float:
        return self.n * self.pixel

    def centres(self) -> np.ndarray:
        return (np.arange(self.n) - (self.n - 1) / 2) * self.pixel

    def xy(self) -> tuple[np.ndarray, np.ndarray]:
        """Pixel centres as two ``(n, n)`` arrays (x varies along columns)."""
        c = self.centres()
        return np.meshgrid(c, c)


@dataclass(frozen=True)
class Roi:
    """A circular region of interest: where an insert's mean RSP is scored."""

    name: str
    x: float
    y: float
    radius: float
    rsp: float
    insert_radius: float = 0.0  # of the insert the ROI sits in (for its edge), if round


@dataclass(frozen=True)
class Phantom:
    name: str
    shapes: np.ndarray  # (k, 7) float64: CX, CY, A, B, ANGLE, VALUE, MODE
    radius: float  # every shape lies within this distance of the axis
    rois: tuple[Roi, ...] = field(default=())
    body: Roi | None = None  # the uniform centre region for bias and noise
    rmse_radius: float = 0.0  # the RMSE is taken inside this radius

    def rsp(self, x, y) -> np.ndarray:
        """True RSP at points ``(x, y)`` (arrays of any shape)."""
        x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
        value = np.zeros(np.broadcast(x, y).shape)
        for cx, cy, a, b, angle, v, mode in self.shapes:
            inside = _inside(x - cx, y - cy, a, b, math.cos(angle), math.sin(angle))
            if mode == ADD:
                value = value + np.where(inside, v, 0.0)
            else:
                value = np.where(inside, v, value)
        return value

    def raster(self, grid: Grid, oversample: int = 4) -> np.ndarray:
        """The mean true RSP of each pixel of ``grid`` (``oversample``^2 points per pixel)."""
        offsets = ((np.arange(oversample) + 0.5) / oversample - 0.5) * grid.pixel
        x, y = grid.xy()
        total = np.zeros((grid.n, grid.n))
        for dy in offsets:
            for dx in offsets:
                total += self.rsp(x + dx, y + dy)
        return total / oversample**2


def _inside(dx, dy, a, b, cos, sin):
    u, v = dx * cos + dy * sin, -dx * sin + dy * cos
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


def rsp_at(shapes: np.ndarray, x: float, y: float) -> float:
    """True RSP at one point: the simulator's inner loop (compiled by Numba there)."""
    value = 0.0
    for k in range(shapes.shape[0]):
        dx, dy = x - shapes[k, CX], y - shapes[k, CY]
        cos, sin = math.cos(shapes[k, ANGLE]), math.sin(shapes[k, ANGLE])
        u, v = dx * cos + dy * sin, -dx * sin + dy * cos
        if (u / shapes[k, A]) ** 2 + (v / shapes[k, B]) ** 2 <= 1.0:
            if shapes[k, MODE] == ADD:
                value += shapes[k, VALUE]
            else:
                value = shapes[k, VALUE]
    return value


# ------------------------------------------------------------------- CTP404
#: Inserts of the CTP404 module (pCT Collaboration's analysis macro): angle (degrees,
#: counter-clockwise from +x), material, RSP.
CTP404_INSERTS = (
    (0, "Delrin", 1.354), (60, "Teflon", 1.838), (90, "air", 0.0014), (120, "PMP", 0.869),
    (180, "LDPE", 0.9973), (240, "polystyrene", 1.0386), (270, "air", 0.0014),
    (300, "acrylic", 1.155),
)
CTP404_RADIUS = 7.5  # cm: the 15 cm cylinder
CTP404_INSERT_RADIUS = 0.61  # cm: inserts 12.2 mm across
CTP404_INSERT_RING = 5.85  # cm from the axis
ROI_RADIUS = 0.4  # cm: the insert ROIs of docs/pct.md section 7


def ctp404(body_rsp: float = 1.0) -> Phantom:
    """The CTP404-like cylinder of docs/pct.md section 7: a 15 cm body with 8 inserts."""
    shapes = [(0.0, 0.0, CTP404_RADIUS, CTP404_RADIUS, 0.0, body_rsp, SET)]
    rois = []
    for degrees, material, rsp in CTP404_INSERTS:
        x = CTP404_INSERT_RING * math.cos(math.radians(degrees))
        y = CTP404_INSERT_RING * math.sin(math.radians(degrees))
        shapes.append((x, y, CTP404_INSERT_RADIUS, CTP404_INSERT_RADIUS, 0.0, rsp, SET))
        rois.append(Roi(f"{material} ({degrees} deg)", x, y, ROI_RADIUS, rsp,
                        CTP404_INSERT_RADIUS))
    return Phantom("CTP404", np.array(shapes), CTP404_RADIUS, tuple(rois),
                   body=Roi("body centre", 0.0, 0.0, 2.0, body_rsp), rmse_radius=7.3)


# ------------------------------------------------------------------- Shepp-Logan
#: The 10 ellipses of Shepp and Logan (1974) in units of 10 cm: centre, semi-axes, angle
#: (degrees), and the RSP each adds (docs/pct.md section 7: skull 1.65, brain 1.04, ventricles 1.00,
#: features 1.06).
SHEPP_LOGAN = (
    (0.0, 0.0, 0.69, 0.92, 0, 1.65),
    (0.0, -0.0184, 0.6624, 0.874, 0, -0.61),
    (0.22, 0.0, 0.11, 0.31, -18, -0.04),
    (-0.22, 0.0, 0.16, 0.41, 18, -0.04),
    (0.0, 0.35, 0.21, 0.25, 0, 0.02),
    (0.0, 0.1, 0.046, 0.046, 0, 0.02),
    (0.0, -0.1, 0.046, 0.046, 0, 0.02),
    (-0.08, -0.605, 0.046, 0.023, 0, 0.02),
    (0.0, -0.606, 0.023, 0.023, 0, 0.02),
    (0.06, -0.605, 0.023, 0.046, 0, 0.02),
)


def shepp_logan() -> Phantom:
    """Shepp-Logan's head, 13.8 x 18.4 cm, in RSP."""
    unit = 10.0
    shapes = np.array([(x * unit, y * unit, a * unit, b * unit, math.radians(deg), v, ADD)
                       for x, y, a, b, deg, v in SHEPP_LOGAN])
    phantom = Phantom("Shepp-Logan", shapes, 0.92 * unit)
    rois = tuple(Roi(name, x, y, r, float(phantom.rsp(x, y)))
                 for name, x, y, r in (("brain", 0.0, -3.0, 0.8), ("left ventricle", -2.2, 0.0, 0.5),
                                       ("right ventricle", 2.2, 0.0, 0.4),
                                       ("upper feature", 0.0, 3.5, 0.8)))
    return Phantom("Shepp-Logan", shapes, 0.92 * unit, rois,
                   body=Roi("brain", 0.0, -3.0, 0.8, rois[0].rsp), rmse_radius=6.5)


PHANTOMS = {"ctp404": ctp404, "shepp-logan": shepp_logan}

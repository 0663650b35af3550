"""How good a reconstruction is, in docs/pct.md section 7's terms: insert errors, air, body bias,
noise, RMSE and the sharpness of the Teflon insert's edge."""

from __future__ import annotations

import math

import numpy as np

from .phantom import Grid, Phantom, Roi

AIR = 0.01  # an insert this close to RSP 0 is scored by its absolute value


def roi_mean(image: np.ndarray, grid: Grid, roi: Roi) -> float:
    return float(image[_disc(grid, roi.x, roi.y, roi.radius)].mean())


def roi_std(image: np.ndarray, grid: Grid, roi: Roi) -> float:
    return float(image[_disc(grid, roi.x, roi.y, roi.radius)].std(ddof=1))


def insert_table(image: np.ndarray, grid: Grid, phantom: Phantom) -> list[dict]:
    """Per insert: true and measured mean RSP, and the error (percent, or absolute for air)."""
    rows = []
    for roi in phantom.rois:
        mean = roi_mean(image, grid, roi)
        air = roi.rsp < AIR
        rows.append({"insert": roi.name, "true": roi.rsp, "mean": mean, "air": air,
                     "error_pct": None if air else 100 * (mean - roi.rsp) / roi.rsp})
    return rows


def edge_width(image: np.ndarray, grid: Grid, x0: float, y0: float, radius: float,
               directions: int = 64) -> float:
    """10-90% width (cm) of the edge of the round insert of ``radius`` at ``(x0, y0)``: the
    profile from its centre outwards, averaged over ``directions``, between the plateau of
    its middle (r < R/2) and the ring around it (1.5 R to 2.2 R; the CTP404's inserts sit
    1.65 cm from the body's edge, so that ring stays in the body)."""
    r = np.arange(0.0, 2.2 * radius, grid.pixel / 10)
    angles = np.arange(directions) * 2 * math.pi / directions
    x = x0 + r[None, :] * np.cos(angles)[:, None]
    y = y0 + r[None, :] * np.sin(angles)[:, None]
    profile = _bilinear(image, grid, x, y).mean(axis=0)
    inner = profile[r < 0.5 * radius].mean()
    outer = profile[r > 1.5 * radius].mean()
    level = (profile - outer) / (inner - outer)  # 1 inside, 0 outside
    edge = (r > 0.5 * radius) & (r < 1.5 * radius)
    r90, r10 = _crossing(r[edge], level[edge], 0.9), _crossing(r[edge], level[edge], 0.1)
    return r10 - r90


def figures(image: np.ndarray, grid: Grid, phantom: Phantom, truth: np.ndarray) -> dict:
    """The scored figures of one image (lengths in mm, errors in percent)."""
    table = insert_table(image, grid, phantom)
    solid = [abs(row["error_pct"]) for row in table if not row["air"]]
    air = [abs(row["mean"]) for row in table if row["air"]]
    body = phantom.body
    assert body is not None  # every phantom that is scored has one
    inside = _disc(grid, 0.0, 0.0, phantom.rmse_radius)
    out = {
        "max_insert_error_pct": max(solid) if solid else None,
        "mean_insert_error_pct": float(np.mean(solid)) if solid else None,
        "air_max_abs": max(air) if air else None,
        "body_error_pct": 100 * abs(roi_mean(image, grid, body) / body.rsp - 1),
        "noise_pct": 100 * roi_std(image, grid, body) / body.rsp,
        "rmse": float(np.sqrt(np.mean((image[inside] - truth[inside]) ** 2))),
    }
    teflon = next((roi for roi in phantom.rois if roi.name.startswith("Teflon")), None)
    if teflon is not None:
        out["edge_mm"] = 10 * edge_width(image, grid, teflon.x, teflon.y, teflon.insert_radius)
    return out


def _disc(grid: Grid, x0: float, y0: float, radius: float) -> np.ndarray:
    x, y = grid.xy()
    return (x - x0) ** 2 + (y - y0) ** 2 <= radius**2


def _bilinear(image: np.ndarray, grid: Grid, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    j = x / grid.pixel + (grid.n - 1) / 2
    i = y / grid.pixel + (grid.n - 1) / 2
    j0 = np.clip(np.floor(j).astype(int), 0, grid.n - 2)
    i0 = np.clip(np.floor(i).astype(int), 0, grid.n - 2)
    fj, fi = j - j0, i - i0
    return ((1 - fi) * ((1 - fj) * image[i0, j0] + fj * image[i0, j0 + 1])
            + fi * ((1 - fj) * image[i0 + 1, j0] + fj * image[i0 + 1, j0 + 1]))


def _crossing(r: np.ndarray, level: np.ndarray, value: float) -> float:
    """The first radius where ``level`` falls through ``value`` (linear between samples)."""
    below = np.nonzero(level <= value)[0]
    if below.size == 0 or below[0] == 0:
        return float(r[0] if below.size else r[-1])
    k = below[0]
    f = (level[k - 1] - value) / (level[k - 1] - level[k])
    return float(r[k - 1] + f * (r[k] - r[k - 1]))

"""Proton histories without Geant4: straight entry, multiple Coulomb scattering through the
phantom, energy straggling, tracker noise and nuclear-like outliers (docs/pct.md section 7).

A history is what a 2D scanner records: the gantry angle ``phi``, the entry tracker's
``t_in``/``theta_in`` at u = -U, the exit tracker's ``t_out``/``theta_out`` at u = +U, and the
water-equivalent path length ``wepl`` (cm). Histories come in chunks of ``CHUNK``; chunk ``k``
of seed ``s`` is a pure function of ``(s, k)``, so a run is the same on 1, 2 or 4 engines
whichever engine simulates which chunk, and an engine that dies can be replaced by one that
simulates its chunks again.

Each proton draws a continuous angle and a random depth offset for its steps (a discrete set
of views streaks the image and a fixed depth grid rings it, docs/pct.md section 9).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import mlp
from .phantom import Phantom, rsp_at

CHUNK = 1 << 15  # histories per chunk
FIELDS = ("phi", "t_in", "theta_in", "t_out", "theta_out", "wepl")
STEP = 0.1  # cm: depth step through the phantom
BEAM_SPREAD = 0.002  # rad: the incoming beam's angular spread
TRACKER_T, TRACKER_THETA = 0.01, 0.001  # cm, rad: tracker resolution
NUCLEAR_PER_CM = 0.005  # chance per cm of water of a nuclear-like event
STRAGGLING = 0.09  # cm: WEPL noise is STRAGGLING * (wepl / cm) ** (1/3)


@dataclass(frozen=True)
class Scan:
    """Where the trackers are and what the beam covers."""

    fov: float  # cm: the beam's lateral extent, -fov/2 .. fov/2
    tracker: float  # cm: trackers at u = -tracker and u = +tracker

    @classmethod
    def around(cls, phantom: Phantom, fov: float) -> Scan:
        return cls(fov=fov, tracker=max(fov / 2, phantom.radius) + 5.0)


def chunk_sizes(histories: int) -> list[int]:
    """Histories per chunk: full chunks, then the rest."""
    full, rest = divmod(int(histories), CHUNK)
    return [CHUNK] * full + ([rest] if rest else [])


def chunk_seed(seed: int, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, chunk]).generate_state(1, np.uint32)[0])


def simulate_chunk(phantom: Phantom, scan: Scan, seed: int, chunk: int, count: int) -> np.ndarray:
    """Histories ``count`` of chunk ``chunk``: a ``(count, 6)`` float32 array, columns FIELDS."""
    out = np.empty((count, len(FIELDS)), dtype=np.float32)
    _kernel()(phantom.shapes, phantom.radius + STEP, scan.fov, scan.tracker,
              chunk_seed(seed, chunk), out)
    return out


def simulate(phantom: Phantom, scan: Scan, histories: int, seed: int = 0) -> np.ndarray:
    """All histories of a run, chunk after chunk (what the engines do between them)."""
    return np.concatenate([simulate_chunk(phantom, scan, seed, k, n)
                           for k, n in enumerate(chunk_sizes(histories))])


def polynomial(w):
    """1/(beta^2 p^2) at water-equivalent depth ``w`` (MeV^-2): Schulte's fit at 200 MeV."""
    a = mlp.SCHULTE
    return a[0] + w * (a[1] + w * (a[2] + w * (a[3] + w * (a[4] + w * a[5]))))


def highland(wet):
    """The Highland factor of a path of ``wet`` cm of water: E0^2 (1 + 0.038 ln(W/X0))^2 / X0."""
    log = 1.0 + 0.038 * math.log(max(wet, 1e-3) / mlp.X0)
    return mlp.E0 * mlp.E0 * log * log / mlp.X0


def _track(shapes, radius, fov, tracker, out, i):
    """One proton: draw it, fly it through the phantom, record what the trackers see."""
    phi = np.random.uniform(0.0, 2.0 * math.pi)
    t = np.random.uniform(-fov / 2, fov / 2)
    theta = np.random.normal(0.0, BEAM_SPREAD)
    cos, sin = math.cos(phi), math.sin(phi)
    t_in = t + np.random.normal(0.0, TRACKER_T)
    theta_in = theta + np.random.normal(0.0, TRACKER_THETA)
    # Straight through air to the circle of radius `radius` that holds the phantom.
    t += (tracker - radius) * math.tan(theta)
    # A straight-line estimate of the water-equivalent thickness, for the Highland factor.
    wet, u = 0.0, -radius + 0.25
    while u < radius:
        tu = t + (u + radius) * math.tan(theta)
        wet += rsp_at(shapes, u * cos - tu * sin, u * sin + tu * cos) * 0.5
        u += 0.5
    wet *= math.sqrt(1.0 + math.tan(theta) ** 2)
    factor = highland(wet)
    w, u = 0.0, -radius
    first = STEP * np.random.uniform(0.0, 1.0)  # the random depth offset of this proton
    while u < radius:
        du = min(first if first > 0.0 else STEP, radius - u)
        first = 0.0
        mid = u + du / 2
        tm = t + du / 2 * math.tan(theta)
        rho = rsp_at(shapes, mid * cos - tm * sin, mid * sin + tm * cos)
        ds = du * math.sqrt(1.0 + math.tan(theta) ** 2)
        dw = rho * ds
        if dw > 0.0:
            sigma = math.sqrt(factor * polynomial(w + dw / 2) * dw)
            z1, z2 = np.random.normal(0.0, 1.0), np.random.normal(0.0, 1.0)
            t += du * math.tan(theta) + ds * sigma * (z1 / math.sqrt(12.0) + z2 / 2)
            theta += sigma * z2
        else:
            t += du * math.tan(theta)
        w += dw
        u += du
    t += (tracker - radius) * math.tan(theta)
    wepl = w + np.random.normal(0.0, STRAGGLING * w ** (1.0 / 3.0)) if w > 0.0 else 0.0
    theta_out = theta
    if np.random.uniform(0.0, 1.0) < NUCLEAR_PER_CM * w:
        wepl += np.random.uniform(1.0, 10.0)
        theta_out += np.random.normal(0.0, 0.05)
    out[i, 0] = phi
    out[i, 1] = t_in
    out[i, 2] = theta_in
    out[i, 3] = t + np.random.normal(0.0, TRACKER_T)
    out[i, 4] = theta_out + np.random.normal(0.0, TRACKER_THETA)
    out[i, 5] = wepl


_compiled = None


def _kernel():
    """The per-chunk loop, compiled once per process (cached on disk by Numba)."""
    global _compiled
    if _compiled is None:
        import numba
        from numba.extending import register_jitable

        for f in (rsp_at, polynomial, highland, _track):
            register_jitable(f)

        @numba.njit(cache=True, nogil=True)
        def run(shapes, radius, fov, tracker, seed, out):
            np.random.seed(seed)
            for i in range(out.shape[0]):
                _track(shapes, radius, fov, tracker, out, i)

        _compiled = run
    return _compiled


def water_tracks(count: int, length: float = 20.0, seed: int = 0) -> tuple[np.ndarray, ...]:
    """True paths of ``count`` protons through ``length`` cm of water, entering at t = 0 along
    the axis, by the simulator's stepping law: ``(depths, t, theta)``, the last two
    ``(count, steps + 1)``. For pictures and checks of the MLP, which only sees the ends."""
    rng = np.random.default_rng(seed)
    steps = round(length / STEP)
    depths = np.linspace(0.0, length, steps + 1)
    t = np.zeros((count, steps + 1))
    theta = np.zeros((count, steps + 1))
    factor = highland(length)
    for k in range(steps):
        sigma = math.sqrt(factor * polynomial(depths[k] + STEP / 2) * STEP)
        z1, z2 = rng.standard_normal(count), rng.standard_normal(count)
        ds = STEP * np.sqrt(1 + np.tan(theta[:, k]) ** 2)
        t[:, k + 1] = t[:, k] + STEP * np.tan(theta[:, k]) + ds * sigma * (z1 / math.sqrt(12) + z2 / 2)
        theta[:, k + 1] = theta[:, k] + sigma * z2
    return depths, t, theta

"""Proton CT: from simulated proton histories to a relative-stopping-power image, in parallel.

Stages, one module each: ``phantom`` (what is scanned), ``simulate`` (proton histories),
``cuts`` (robust 3-sigma cuts), ``fbp`` (the first image and the hull), ``mlp`` (most likely
paths), ``system`` (the rows of the system matrix), ``solve`` (DROP with TV
superiorization), ``metrics`` (how good the image is). ``share`` is what each engine keeps.

The histories are cut in chunks that the engines simulate and keep; cuts and FBP are
reductions of histograms and sinograms; DROP is one image-sized reduction per block. Nothing
depends on which engine holds which chunk, so 1, 2 or 4 engines give the same image (to
rounding) for a seed.

    from cloudlab.workloads import pct
    result = pct.reconstruct(cluster, size="small")
    result.figures["max_insert_error_pct"]
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .solve import Drop


@dataclass(frozen=True)
class Size:
    phantom: str
    n: int  # pixels across
    pixel: float  # cm
    fov: float  # cm
    histories: int


SIZES = {
    "small": Size("ctp404", 128, 0.125, 16.0, 900_000),
    "medium": Size("ctp404", 256, 0.0625, 16.0, 2_500_000),
    "large": Size("ctp404", 320, 0.05, 16.0, 15_000_000),
    "small-shepp-logan": Size("shepp-logan", 160, 0.125, 20.0, 1_200_000),
}


@dataclass
class Reconstruction:
    """What a run produced: images (RSP), the truth, figures, and stage times (s)."""

    size: Size
    truth: np.ndarray
    sinogram: np.ndarray  # mean WEPL per (angle, offset) bin over 180 degrees
    fbp: np.ndarray
    image: np.ndarray  # DROP with TV superiorization (plain DROP if run without TV)
    plain: np.ndarray  # plain DROP
    hull: np.ndarray
    figures: dict
    figures_plain: dict
    figures_fbp: dict
    seconds: dict[str, float]
    histories: int
    kept: int
    rows: int
    nonzeros: int
    engines: int
    peak_memory: int  # bytes: the engines' peak resident memory plus this process's
    inserts: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The figures ``cloudlab run pct --json`` prints."""
        f, p, g = self.figures, self.figures_plain, self.figures_fbp
        return {
            "size": self.size.phantom + f" {self.size.n}x{self.size.n}",
            "max_insert_error_pct": f["max_insert_error_pct"],
            "air_max_abs": f["air_max_abs"],
            "body_error_pct": f["body_error_pct"],
            "noise_pct": p["noise_pct"],
            "noise_tv_pct": f["noise_pct"] if self.image is not self.plain else None,
            "rmse": f["rmse"],
            "rmse_fbp": g["rmse"],
            "edge_mm": f.get("edge_mm"),
            "edge_fbp_mm": g.get("edge_mm"),
            "seconds_excluding_simulation": sum(v for k, v in self.seconds.items()
                                                if k != "simulate"),
            "seconds": self.seconds,
            "histories": self.histories,
            "kept": self.kept,
            "rows": self.rows,
            "bytes_per_history": 8 * self.nonzeros / max(self.rows, 1) + 24,
            "engines": self.engines,
            "peak_memory_gb": self.peak_memory / 1e9,
        }


class Shares:
    """Where the histories live: the engines of ``cluster``, or this process (None)."""

    def __init__(self, cluster=None):
        self.cluster = cluster
        self.run = uuid.uuid4().hex[:12]

    def map(self, fn: Callable, items: list[tuple]) -> list:
        if self.cluster is None:
            return [fn(self.run, *item) for item in items]
        return self.cluster.map(_Star(fn, self.run), items, chunksize=1)

    def each(self, fn: Callable, *args) -> list:
        """``fn(run, *args)`` on every share, in engine order."""
        if self.cluster is None:
            return [fn(self.run, *args)]
        return [v for _, v in sorted(self.cluster.run(fn, self.run, *args).items())]

    def total(self, fn: Callable, chunks: int, *args):
        """The sum of ``fn``'s values over every share, checking that they held every chunk."""
        replies = self.each(fn, *args)
        held = sorted(c for r in replies for c in r.chunks)
        if held != list(range(chunks)):
            lost = sorted(set(range(chunks)) - set(held))
            raise RuntimeError(f"the histories of chunks {lost} were lost (an engine left the "
                               f"cluster during the reconstruction); run it again.")
        values = [r.value for r in replies if r.chunks]  # engines without a share add nothing
        if isinstance(values[0], tuple):
            return tuple(sum(v) for v in zip(*values))
        return sum(values[1:], values[0])


class _Star:
    """``fn(run, *item)`` for ``map``: a picklable partial by module reference."""

    def __init__(self, fn: Callable, run: str):
        self.fn, self.run = fn, run
        self.__name__ = fn.__name__

    def __call__(self, item: tuple):
        return self.fn(self.run, *item)


def reconstruct(cluster=None, size: str | Size = "small", seed: int = 0, tv: bool = True,
                drop=None, path: str = "mlp", on_image: Callable[[str, np.ndarray], None] | None = None,
                histories: int | None = None, device: str = "auto") -> Reconstruction:
    """Simulate, cut, FBP, build the paths' rows and solve with DROP, on ``cluster``'s
    engines (or here, with None); score the images against the phantom.

    DROP runs plain, then (``tv``) with TV superiorization, from the same FBP: the figures
    are the last image's, and ``noise_pct`` the plain one's. ``drop`` (a ``solve.Drop``)
    sets blocks, relaxation and cycles; ``path`` what the rows follow inside the hull: "mlp"
    (the most likely path), "spline" (its cubic approximation) or "straight". ``on_image(label, image)`` sees the FBP and the
    image after each DROP cycle (for a live view); ``histories`` overrides the size's count.
    ``device``: where the rows are built and kept and DROP's products run: ``gpu`` (engines
    with a GPU each, a cluster started with ``--gpus``; or this process's GPU without a
    cluster), ``cpu``, or ``auto`` (gpu on a GPU cluster). Simulation, cuts and FBP run on
    the engines' CPUs either way.
    """
    from ...progress import DONE, FAILED, open_progress
    from . import cuts, fbp, metrics, share, simulate, solve
    from .phantom import PHANTOMS, Grid
    from .system import PATHS

    if path not in PATHS:
        raise ValueError(f"Unknown path {path!r}: choose one of {', '.join(PATHS)}.")
    if isinstance(size, str):
        if size not in SIZES:
            raise ValueError(f"Unknown pCT size {size!r}: choose one of {', '.join(SIZES)}.")
        size = SIZES[size]
    device = _device(cluster, device)
    settings = drop or Drop()
    plain_settings = dataclasses.replace(settings, tv_steps=0)
    phantom = PHANTOMS[size.phantom]()
    grid = Grid(size.n, size.pixel)
    scan = simulate.Scan.around(phantom, size.fov)
    counts = simulate.chunk_sizes(histories or size.histories)
    shares = Shares(cluster)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()

    def lap(stage: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        seconds[stage] = now - clock
        clock = now

    solves = 2 if tv and settings.tv_steps else 1
    progress = open_progress("pCT DROP blocks", solves * settings.cycles * settings.blocks)
    try:
        share.warm_up(device if cluster is None else "cpu")
        if cluster is not None:
            cluster.run(share.warm_up, device)
        lap("compile")
        shares.map(share.simulate_chunk, [(phantom, scan, seed, k, n)
                                          for k, n in enumerate(counts)])
        lap("simulate")
        binning = cuts.Binning(size.fov)
        found = cuts.robust_cuts(binning, lambda level: shares.total(
            share.histogram, len(counts), binning, level))
        kept, usable = shares.total(share.cut, len(counts), binning, found)
        lap("cuts")
        geometry = fbp.Sinogram.for_grid(grid, scan.tracker)
        sums = shares.total(share.sinogram, len(counts), geometry)
        first = fbp.reconstruct(sums, geometry)
        hull = fbp.hull(first)
        x0 = first * hull
        if on_image is not None:
            on_image("FBP", x0)
        lap("fbp")
        crossings, rows, nonzeros = shares.total(share.build_rows, len(counts), hull, grid,
                                                 scan.tracker, settings.blocks, path, device)
        lap("system")

        def block_sum(t: int, x: np.ndarray) -> np.ndarray:
            return shares.total(share.block_sum, len(counts), t, x)

        def seen(label: str):
            def block_done(cycle: int, t: int, x: np.ndarray) -> None:
                progress.advance(1)
                if on_image is not None and t == settings.blocks - 1:
                    on_image(f"{label}: cycle {cycle + 1} of {settings.cycles}", x)
            return block_done

        plain = solve.drop(x0, hull, crossings, block_sum, plain_settings, seen("DROP"))
        lap("solve")
        image = plain
        if tv and settings.tv_steps:
            image = solve.drop(x0, hull, crossings, block_sum, settings, seen("DROP + TV"))
            lap("solve_tv")
        engines_memory = 0 if cluster is None else shares.total(share.peak_memory, len(counts))
        memory = share.process_peak_memory() + engines_memory
        progress.finish(DONE)
    except BaseException as e:
        progress.finish(FAILED, str(e).split("\n")[0])
        raise
    finally:
        try:
            shares.each(share.forget)
        except Exception:
            pass
    truth = phantom.raster(grid)
    return Reconstruction(
        size=size, truth=truth, sinogram=fbp.projections(sums), fbp=x0, image=image,
        plain=plain, hull=hull,
        figures=metrics.figures(image, grid, phantom, truth),
        figures_plain=metrics.figures(plain, grid, phantom, truth),
        figures_fbp=metrics.figures(x0, grid, phantom, truth),
        seconds=seconds, histories=sum(counts), kept=kept, rows=rows, nonzeros=nonzeros,
        engines=1 if cluster is None else len(cluster.engine_ids), peak_memory=memory,
        inserts=metrics.insert_table(image, grid, phantom))


def _device(cluster, device: str) -> str:
    """The cluster's device (see gpus.device_for); without a cluster, this process's GPU."""
    from ...gpus import device_for
    from . import gpu

    if cluster is not None:
        return device_for(cluster, device)

    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, not {device!r}.")
    if device == "gpu" and not gpu.available():
        raise ValueError("device='gpu' needs a GPU and CuPy in this process: "
                         "pip install 'cloudlab[gpu]' on a machine with an NVIDIA GPU.")
    return "gpu" if device == "gpu" else "cpu"


# ----------------------------------------------------------------- `cloudlab run pct`
def add_arguments(parser) -> None:
    parser.add_argument("--size", default="small", choices=list(SIZES),
                        help="phantom, grid and history count (default small)")
    parser.add_argument("--seed", type=int, default=0, help="simulation seed (default 0)")
    parser.add_argument("--no-tv", action="store_true", help="plain DROP, no TV superiorization")
    parser.add_argument("--path", default="mlp", choices=["mlp", "spline", "straight"],
                        help="what each proton's row follows inside the hull (default mlp)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                        help="where rows and DROP run: auto (gpu on a --gpus cluster), cpu, gpu")


def run(cluster, args) -> dict:
    return reconstruct(cluster, args.size, seed=args.seed, tv=not args.no_tv,
                       path=args.path, device=args.device).to_dict()


def summary(figures: dict) -> str:
    return (f"pCT {figures['size']} from {figures['histories']:,} histories on "
            f"{figures['engines']} engines: max insert error {figures['max_insert_error_pct']:.2f}%, "
            f"noise {figures['noise_pct']:.2f}%, RMSE {figures['rmse']:.4f} (FBP "
            f"{figures['rmse_fbp']:.4f}), edge {figures['edge_mm']:.2f} mm; "
            f"{figures['seconds_excluding_simulation']:.1f} s excluding simulation.")


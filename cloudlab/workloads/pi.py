"""Monte Carlo pi: the fraction of random points of the unit square inside the quarter circle.

Sample ``i`` of a run is a pure function of ``(seed, i)``, so an estimate is reproducible for a
seed whatever the engine count. Samples come in blocks of 2**20: block ``b`` takes a key
``(c, m)``, ``m`` odd, from SplitMix64 of ``seed_key(seed) + b * GAMMA``, and sample ``j`` of the
block is the 32-bit hash ``lowbias32(c + j * m)``, whose halves are the cell ``(x, y)`` of a
2**16 x 2**16 grid. The point is the cell's centre, so the inside test
``(2x+1)**2 + (2y+1)**2 < 2**34``, that is ``x*(x+1) <= ~(y*(y+1))`` in uint32, is exact integer
arithmetic, and the grid biases the estimate by only 5e-8 (one standard error at 1e15
samples). Within a block the hash is a bijection, so points never repeat (sampling without
replacement from 2**32 cells: no visible difference); blocks have independent keys.

Why 32 bits: counting is compute bound, and AVX2 multiplies 32-bit integers on 8 lanes but has
no 64-bit multiply, so this counts ~4.3 G samples/s per core where SplitMix64 per sample (64-bit
lanes) counted 1.2. Numba widens integer operators to 64 bits, so the arithmetic is spelt with
NumPy ufuncs, which keep uint32 (and wrap) both in Numba and on arrays: the Numba kernel and
the NumPy reference share ``_block_key`` and ``_inside`` and so count exactly the same points.

On GPUs (``device="gpu"``, the default on a cluster started with ``--gpus``), one fused CUDA
kernel (``kernels/pi.cu``, through CuPy) spells the same arithmetic in C and counts the same
points again: same estimate, same statistics, a hundred times the rate.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

GAMMA = 0x9E3779B97F4A7C15  # SplitMix64's increment (golden ratio)
MIX1, MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
BLOCK = 1 << 20  # samples per key
H1, H2 = np.uint32(0x7FEB352D), np.uint32(0x846CA68B)  # lowbias32's multipliers
ONE, S15, S16, LOW16 = np.uint32(1), np.uint32(15), np.uint32(16), np.uint32(0xFFFF)
add, mul, xor, shr = np.add, np.multiply, np.bitwise_xor, np.right_shift  # uint32 in, uint32 out


@dataclass(frozen=True)
class PiResult:
    estimate: float
    stderr: float
    samples: int
    inside: int
    seconds: float
    samples_per_s: float
    engines: int
    seed: int
    device: str = "cpu"  # where the points were counted: cpu or gpu

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        return summary(self.to_dict())


def seed_key(seed: int) -> int:
    """A 64-bit stream key for ``seed`` (well mixed even for seeds 0, 1, 2, ...)."""
    return int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])


def _block_key(key, b):
    """Block ``b``'s ``(c, m)``: SplitMix64 of ``key + b * GAMMA``, split in two 32-bit halves."""
    z = np.uint64(key) + np.uint64(b) * np.uint64(GAMMA)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX2)
    z = z ^ (z >> np.uint64(31))
    return np.uint32(z & np.uint64(0xFFFFFFFF)), np.uint32(np.uint32(z >> np.uint64(32)) | ONE)


def _inside(u):
    """Whether the point hashed from ``u`` (uint32, scalar or array) is inside."""
    h = mul(xor(u, shr(u, S16)), H1)  # lowbias32 (Wellons' hash-prospector)
    h = mul(xor(h, shr(h, S15)), H2)
    x = shr(h, S16)
    y = np.bitwise_and(xor(h, x), LOW16)
    return np.less_equal(mul(x, add(x, ONE)), np.invert(mul(y, add(y, ONE))))


def _blocks(start: int, stop: int):
    """``(b, lo, hi)``: samples ``start..stop-1`` as offsets ``lo..hi-1`` into blocks ``b``."""
    for b in range(start // BLOCK, -(-stop // BLOCK)):
        yield b, max(start - b * BLOCK, 0), min(stop - b * BLOCK, BLOCK)


def count_inside_numpy(key: int | np.uint64, start: int, stop: int) -> int:
    """Reference implementation: points inside for samples ``start..stop-1``."""
    inside = 0
    with np.errstate(over="ignore"):  # SplitMix64 wraps on purpose
        for b, lo, hi in _blocks(start, stop):
            c, m = _block_key(key, b)
            u = add(c, mul(np.arange(lo, hi, dtype=np.uint32), m))
            inside += int(np.count_nonzero(_inside(u)))
    return inside


def _numba_kernel():
    import numba
    from numba.extending import register_jitable

    for f in (_blocks, _block_key, _inside):
        register_jitable(f)  # globals, not closure cells, so that the kernel caches

    @numba.njit(cache=True, nogil=True)
    def count_inside(key, start, stop):
        inside = 0
        for b, lo, hi in _blocks(start, stop):
            c, m = _block_key(key, b)
            u, n = add(c, mul(np.uint32(lo), m)), np.uint32(0)
            for _ in range(lo, hi):  # uint32 lanes throughout: 8 samples per AVX2 instruction
                n = add(n, np.uint32(_inside(u)))
                u = add(u, m)
            inside += n
        return inside

    return count_inside


_kernel = None


def count_inside(key: int, start: int, stop: int) -> int:
    """Points inside for samples ``start..stop-1``: Numba if available, else NumPy."""
    global _kernel
    if _kernel is None:
        try:
            _kernel = _numba_kernel()
        except ImportError:
            _kernel = count_inside_numpy
    return int(_kernel(np.uint64(key), start, stop))


def warm_up(device: str = "cpu") -> None:
    """Compile (or load the cached) kernel before timing starts."""
    if device == "gpu":
        count_inside_gpu(1, 0, 16)
    else:
        count_inside(1, 0, 16)


# ------------------------------------------------------------------------------ GPU
KERNEL_SOURCE = Path(__file__).parent / "kernels" / "pi.cu"
PER_THREAD = 4096  # samples a GPU thread counts: enough to hide the block key's cost
THREADS_PER_BLOCK = 256
LAUNCH = 1 << 36  # samples per kernel launch (a fraction of a second on one GPU)
_gpu_kernel = None


def count_inside_gpu(key: int, start: int, stop: int) -> int:
    """Points inside for samples ``start..stop-1``, counted on this process's GPU."""
    global _gpu_kernel
    try:
        import cupy
    except ImportError:
        raise RuntimeError("Counting on a GPU needs CuPy on the engines: "
                           "pip install 'cloudlab[gpu]'.") from None
    if _gpu_kernel is None:
        _gpu_kernel = cupy.RawKernel(KERNEL_SOURCE.read_text(), "count_inside")
    total = cupy.zeros(1, dtype=cupy.uint64)
    for first in range(start, stop, LAUNCH):
        last = min(first + LAUNCH, stop)
        threads = -(-(last - first) // PER_THREAD)
        blocks = -(-threads // THREADS_PER_BLOCK)
        _gpu_kernel((blocks,), (THREADS_PER_BLOCK,),
                    (np.uint64(key), np.uint64(first), np.uint64(last), np.uint32(PER_THREAD),
                     total))
    return int(total.get()[0])


def _count_task(task: tuple[int, int, int, str]) -> int:
    key, start, stop, device = task
    return (count_inside_gpu if device == "gpu" else count_inside)(key, start, stop)


def estimate(cluster, samples: float, seed: int = 0, tasks: int | None = None,
             plot: bool = False, device: str = "auto") -> PiResult:
    """Estimate pi from ``samples`` points on ``cluster``; reproducible for ``seed``.

    Work is cut into ``tasks`` contiguous counter ranges (default: one per
    engine, or eight per engine with ``plot``). With ``plot=True`` a figure of
    the estimate converging, with its error band, updates as tasks finish. The
    time reported covers the parallel count only; the kernel is compiled once
    here, so engines on this machine load it from Numba's cache (engines on other
    machines compile it once there, before the clock starts). ``device``: ``cpu``, ``gpu``
    (one GPU per engine: a cluster started with ``--gpus``) or ``auto`` (gpu
    where the cluster has GPUs); both count exactly the same points.
    """
    samples = int(samples)
    if samples < 1:
        raise ValueError(f"samples must be at least 1, not {samples}.")
    from ..gpus import device_for

    device = device_for(cluster, device)
    if device == "cpu":
        warm_up()
    cluster.run(warm_up, device)
    n_tasks = tasks or len(cluster.engine_ids) * (8 if plot else 1)
    key = seed_key(seed)
    bounds = [samples * k // n_tasks for k in range(n_tasks + 1)]
    work = [(key, a, b, device) for a, b in zip(bounds, bounds[1:]) if b > a]
    history = Convergence()
    live = None
    if plot:
        from ..widgets.liveplot import LivePlot

        live = LivePlot(history.draw)

    def on_result(index: int, inside: int) -> None:
        _, a, b, _ = work[index]
        history.add(b - a, inside)
        if live is not None:
            live.update()

    t0 = time.perf_counter()
    inside = sum(cluster.map(_count_task, work, chunksize=1, on_result=on_result))
    seconds = time.perf_counter() - t0
    if live is not None:
        live.close()
    p = inside / samples
    return PiResult(
        estimate=4 * p,
        stderr=_stderr(p, samples),
        samples=samples,
        inside=inside,
        seconds=seconds,
        samples_per_s=samples / seconds,
        engines=len(cluster.engine_ids),
        seed=seed,
        device=device,
    )


def _stderr(p: float, n: int) -> float:
    return 4 * math.sqrt(p * (1 - p) / n)


class Convergence:
    """The running estimate as tasks finish: what the live plot shows."""

    def __init__(self) -> None:
        self.samples: list[int] = []
        self.estimates: list[float] = []
        self.stderrs: list[float] = []
        self._n = self._inside = 0

    def add(self, n: int, inside: int) -> None:
        self._n += n
        self._inside += inside
        p = self._inside / self._n
        self.samples.append(self._n)
        self.estimates.append(4 * p)
        self.stderrs.append(_stderr(p, self._n))

    def draw(self, fig) -> None:
        ax = fig.add_subplot()
        ax.axhline(math.pi, color="gray", linestyle="--", linewidth=1, label="pi")
        if self.samples:
            est, err = np.array(self.estimates), np.array(self.stderrs)
            ax.fill_between(self.samples, est - 2 * err, est + 2 * err, alpha=0.3,
                            label="+/- 2 standard errors")
            ax.plot(self.samples, est, marker="o", markersize=3, label="estimate")
            ax.set_title(f"pi ~ {est[-1]:.6f} +/- {err[-1]:.6f} after {self.samples[-1]:.3g} samples")
        else:
            ax.set_title("waiting for the first task...")
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter("")  # decades only: minor labels collide
        ax.set_xlabel("samples so far")
        ax.set_ylabel("estimate of pi")
        ax.legend(loc="upper right")


# ----------------------------------------------------------------- `cloudlab run pi`
def add_arguments(parser) -> None:
    parser.add_argument("--samples", type=float, default=1e9, help="points to draw (default 1e9)")
    parser.add_argument("--seed", type=int, default=0, help="stream seed (default 0)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                        help="where to count: auto (gpu on a --gpus cluster), cpu or gpu")


def run(cluster, args) -> dict:
    return estimate(cluster, args.samples, seed=args.seed, device=args.device).to_dict()


def summary(figures: dict) -> str:
    return (f"pi ~ {figures['estimate']:.6f} +/- {figures['stderr']:.6f} from "
            f"{figures['samples']:.3g} samples in {figures['seconds']:.2f} s "
            f"({figures['samples_per_s'] / 1e9:.2f} G samples/s on {figures['engines']} engines"
            f"{', GPUs' if figures.get('device') == 'gpu' else ''}); "
            f"error {abs(figures['estimate'] - math.pi) / figures['stderr']:.1f} standard errors.")

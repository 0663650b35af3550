"""MPI ring: message latency and bandwidth around a ring of MPI ranks, the engines.

Rank 0 sends a message to rank 1, which passes it to rank 2, and so on back to rank 0: one
lap is ``ranks`` hops. Many laps are timed for each message size, and the time per hop is
the latency; the size over that time is the bandwidth. The ranks are a cluster's engines
started as one MPI job (``Cluster(4, mpi=True)``, ``%cluster start 4 --mpi``), so the code
runs on them with mpi4py, over whatever Open MPI picks for the path between them.

    from cloudlab.workloads import ring
    result = ring.measure(cluster)          # every engine takes part
    result.per_hop_us                       # 1-byte latency, microseconds
    ring.plot(result)                       # latency and bandwidth against message size
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

#: Message sizes in bytes: from one byte, where latency rules, to 4 MiB, where bandwidth does.
SIZES = (1, 8, 64, 512, 4096, 32768, 262144, 1048576, 4194304)
#: Seconds each message size is timed for, about (laps are sized from a first, short run).
SECONDS_PER_SIZE = 0.2


@dataclass(frozen=True)
class RingResult:
    ranks: int
    hosts: list[str]
    sizes: list[int]
    latency_us: list[float]  # per hop, by size
    bandwidth_mb_s: list[float]  # 10**6 bytes per second, by size
    laps: list[int]
    seconds: float
    mpi_library: str
    #: Whether a token passed through every rank and back (each added 1 to it).
    went_around: bool

    @property
    def per_hop_us(self) -> float:
        """Latency of the smallest message, per hop."""
        return self.latency_us[0]

    def to_dict(self) -> dict:
        return {**asdict(self), "per_hop_latency_us": self.per_hop_us}


def around_the_ring(sizes: list[int], seconds_per_size: float) -> dict:
    """On every rank at once: pass messages of each size around the ring; rank 0 times it."""
    import socket

    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    after, before = (rank + 1) % size, (rank - 1) % size

    def laps_of(buffer: np.ndarray, laps: int) -> float:
        comm.Barrier()
        t0 = MPI.Wtime()
        for _ in range(laps):
            if rank == 0:
                comm.Send(buffer, dest=after)
                comm.Recv(buffer, source=before)
            else:
                comm.Recv(buffer, source=before)
                comm.Send(buffer, dest=after)
        return MPI.Wtime() - t0

    # One lap where every rank adds 1 to the first byte: rank 0 gets back ``size``.
    token = np.zeros(1, dtype=np.int64)
    if rank == 0:
        comm.Send(token + 1, dest=after)
        comm.Recv(token, source=before)
    else:
        comm.Recv(token, source=before)
        comm.Send(token + 1, dest=after)
    rows = []
    for nbytes in sizes:
        buffer = np.zeros(nbytes, dtype=np.uint8)
        trial = laps_of(buffer, 3)  # warms the connections up, and sizes the run
        laps = comm.bcast(max(5, min(20_000, int(seconds_per_size / max(trial / 3, 1e-7)))))
        elapsed = laps_of(buffer, laps)
        rows.append((nbytes, laps, elapsed))
    host = socket.gethostname()
    hosts = comm.gather(host)
    return {"rank": rank, "size": size, "rows": rows, "hosts": hosts,
            "went_around": int(token[0]) == size,
            "library": MPI.Get_library_version().split(",")[0].strip("\x00 \n")}


def measure(cluster, sizes=SIZES, seconds_per_size: float = SECONDS_PER_SIZE) -> RingResult:
    """Time the ring on all of ``cluster``'s engines, which must be one MPI job."""
    if not cluster.profile.cluster.mpi:
        raise ValueError(f"Cluster {cluster.name} is not an MPI job: start one with "
                         f"Cluster(4, mpi=True) or %cluster start 4 --mpi.")
    if len(cluster.engine_ids) < 2:
        raise ValueError("A ring needs at least 2 ranks: start a cluster of 2 or more engines.")
    sizes = [int(s) for s in sizes]
    if not sizes or min(sizes) < 1:
        raise ValueError(f"Message sizes are whole numbers of bytes from 1, not {sizes}.")
    t0 = time.perf_counter()
    replies = cluster.run(around_the_ring, sizes, seconds_per_size)
    seconds = time.perf_counter() - t0
    first = next(r for r in replies.values() if r["rank"] == 0)
    ranks = first["size"]
    latency = [elapsed / (laps * ranks) for _, laps, elapsed in first["rows"]]
    return RingResult(
        ranks=ranks, hosts=first["hosts"], sizes=sizes,
        latency_us=[t * 1e6 for t in latency],
        bandwidth_mb_s=[n / t / 1e6 for n, t in zip(sizes, latency)],
        laps=[laps for _, laps, _ in first["rows"]], seconds=seconds,
        mpi_library=first["library"], went_around=first["went_around"])


def plot(result: RingResult, ax=None):
    """Latency (left) and bandwidth (right) against message size, both on log scales."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    left, right = ax
    left.loglog(result.sizes, result.latency_us, "o-")
    left.set(xlabel="message size (bytes)", ylabel="latency per hop (µs)",
             title=f"Ring of {result.ranks} ranks: latency")
    right.loglog(result.sizes, result.bandwidth_mb_s, "o-", color="tab:orange")
    right.set(xlabel="message size (bytes)", ylabel="bandwidth (MB/s)", title="bandwidth")
    for a in ax:
        a.grid(True, which="both", alpha=0.3)
    return ax


# ---------------------------------------------------------------------- cloudlab run ring
def add_arguments(parser) -> None:
    parser.add_argument("--ranks", type=int, default=None,
                        help="MPI ranks, one engine each (default: --engines, or 4)")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated message sizes in bytes (default: 1 B to 4 MiB)")


def cluster_options(args) -> dict:
    """The ring runs on an MPI job of ``--ranks`` engines."""
    return {"n": args.ranks or args.engines or 4, "mpi": True}


def prepare(args) -> list[int]:
    if args.ranks is not None and args.ranks < 2:
        raise ValueError(f"A ring needs at least 2 ranks, not {args.ranks}: give --ranks 2 "
                         f"or more.")
    if args.sizes is None:
        return list(SIZES)
    try:
        sizes = [int(float(s)) for s in args.sizes.split(",")]
    except ValueError:
        raise ValueError(f"--sizes is comma-separated byte counts like 1,1024,1048576, not "
                         f"{args.sizes!r}.") from None
    if min(sizes) < 1:
        raise ValueError(f"--sizes are byte counts from 1, not {args.sizes!r}.")
    return sizes


def run(cluster, args) -> dict:
    return measure(cluster, args.inputs).to_dict()


def summary(figures: dict) -> str:
    lines = [f"MPI ring of {figures['ranks']} ranks ({figures['mpi_library']}): "
             f"{figures['per_hop_latency_us']:.1f} µs per hop for {figures['sizes'][0]} B."]
    for n, t, bw in zip(figures["sizes"], figures["latency_us"], figures["bandwidth_mb_s"]):
        lines.append(f"  {n:>9,} B  {t:10.1f} µs/hop  {bw:10.1f} MB/s")
    return "\n".join(lines)

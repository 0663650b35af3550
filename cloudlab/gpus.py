"""GPUs on this machine: which there are, which to give each engine, how busy they are.

``%cluster start --gpus all`` (or ``gpus = "all"`` in a profile) starts one engine per GPU,
each seeing only its own through ``CUDA_VISIBLE_DEVICES``, so code on an engine simply uses
"the" GPU (device 0). GPUs are found through NVML (the ``nvidia-ml-py`` package, the driver's
own library): no CUDA toolkit or CuPy is needed to count them. Where the client itself was
given a subset (``CUDA_VISIBLE_DEVICES`` set, as Slurm does), only that subset is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import ConfigError


@dataclass(frozen=True)
class Gpu:
    index: int  # NVML's index on its machine, what CUDA_VISIBLE_DEVICES names
    name: str
    uuid: str
    memory_mb: float
    #: The machine it is in, as its backend names it ("": the client's own).
    host: str = ""

    @property
    def key(self) -> tuple[str, int]:
        return self.host, self.index


@dataclass(frozen=True)
class GpuUsage:
    percent: float  # of the last sample period the GPU ran a kernel
    memory_used_mb: float
    memory_total_mb: float


def request(value: object) -> int | str | None:
    """A ``gpus`` option: ``"all"``, a count (``2`` or ``"2"``) or ``None``/``"none"``."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    if isinstance(value, str) and value.strip().lower() == "all":
        return "all"
    try:
        count = int(value) if not isinstance(value, bool | float) else None  # type: ignore[call-overload]
    except (TypeError, ValueError):
        count = None
    if count is None or count < 1:
        raise ValueError(f"must be \"all\", a count like 2, or \"none\", not {value!r}.")
    return count


def _nvml():
    """The NVML module, initialised; None where there is no driver (or no nvidia-ml-py)."""
    try:
        import pynvml

        pynvml.nvmlInit()
        return pynvml
    except Exception:  # ImportError, or NVMLError: library not found, no driver, no device
        return None


def detect() -> tuple[list[Gpu], str]:
    """The GPUs this process may use, and, when there are none, why (a clause)."""
    nvml = _nvml()
    if nvml is None:
        try:
            import pynvml  # noqa: F401
        except ImportError:
            return [], "this machine offers none (nvidia-ml-py is not installed: pip install " \
                       "nvidia-ml-py)"
        return [], "this machine offers none (no NVIDIA driver answered through NVML)"
    try:
        found = []
        for index in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            name = nvml.nvmlDeviceGetName(handle)
            uuid = nvml.nvmlDeviceGetUUID(handle)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle).total / 1e6
            found.append(Gpu(index, _text(name), _text(uuid), memory))
    finally:
        nvml.nvmlShutdown()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        allowed = [v.strip() for v in visible.split(",") if v.strip()]
        found = [g for g in found if str(g.index) in allowed or g.uuid in allowed]
        if not found:
            return [], (f"this machine offers none (CUDA_VISIBLE_DEVICES={visible!r} hides "
                        f"every GPU from this process)")
    return found, "" if found else "this machine offers none (NVML counts no GPU)"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def choose(wanted: int | str, found: list[Gpu], why_none: str, engines: int | None) -> list[Gpu]:
    """The GPUs for a cluster asked for ``wanted`` GPUs and ``engines`` engines (None: one
    per GPU); a sentence naming the fix when that cannot be."""
    if not found:
        raise ConfigError(f"--gpus {wanted} asks for GPUs, but {why_none}: drop --gpus to run "
                          f"on CPU cores.")
    count = len(found) if wanted == "all" else wanted
    assert isinstance(count, int)  # wanted is "all" or a count: see request
    if count > len(found):
        raise ConfigError(f"--gpus {wanted} asks for {count} GPUs, but only {len(found)} "
                          f"{'is' if len(found) == 1 else 'are'} here: ask for at most "
                          f"{len(found)}, or --gpus all.")
    if engines is not None and engines != count:
        if wanted != "all" or engines > count:
            raise ConfigError(f"A GPU cluster runs one engine per GPU: {engines} engines on "
                              f"{count} GPUs cannot be; give {count} engines or none.")
        count = engines  # `start 2 --gpus all` on a machine of 8: the first two
    return found[:count]


def usage(indices: list[int]) -> dict[int, GpuUsage]:
    """Utilisation and memory of the GPUs ``indices`` now (empty where NVML is absent)."""
    nvml = _nvml() if indices else None
    if nvml is None:
        return {}
    try:
        found = {}
        for index in indices:
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            busy = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
            found[index] = GpuUsage(float(busy), memory.used / 1e6, memory.total / 1e6)
        return found
    except Exception:  # a GPU fallen off the bus: show no figures rather than fail a view
        return {}
    finally:
        nvml.nvmlShutdown()


def device_for(cluster, device: str) -> str:
    """Where a workload computes: ``auto`` -> gpu on a cluster started with ``--gpus``, cpu
    otherwise; ``gpu`` on a cluster without GPUs is refused in a sentence naming the fix."""
    if device not in ("auto", "cpu", "gpu"):
        raise ValueError(f"device must be auto, cpu or gpu, not {device!r}.")
    has_gpus = bool(getattr(cluster, "gpus", None))
    if device == "gpu" and not has_gpus:
        raise ValueError("device='gpu' needs engines with GPUs: start the cluster with "
                         "--gpus all (Cluster(gpus='all')).")
    return device if device != "auto" else ("gpu" if has_gpus else "cpu")

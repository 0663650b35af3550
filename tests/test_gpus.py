"""GPU clusters: one engine per GPU, chosen and named without a GPU where possible.

This machine (and CI) has no GPU. The tests marked ``gpu`` run where one exists and skip
elsewhere. The others run everywhere: the refusal without GPUs is real (NVML finds no driver
here); the engine-per-GPU assignment replaces NVML's answer with two made-up GPUs (a mock:
no real GPU can be had here), and checks what the engines really see.
"""

from __future__ import annotations

import os
import signal
import time

import pytest

import cloudlab
from cloudlab import gpus
from cloudlab.errors import ConfigError
from cloudlab.widgets import status as status_view
from conftest import our_processes, wait_until_gone

HAS_GPU = bool(gpus.detect()[0])
needs_gpu = pytest.mark.gpu
skip_without_gpu = pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU on this machine")


@pytest.mark.parametrize("value, wanted", [("all", "all"), ("ALL", "all"), (2, 2), ("3", 3),
                                           (None, None), ("none", None), ("", None)])
def test_gpu_requests_read_like_the_help_says(value, wanted):
    assert gpus.request(value) == wanted


@pytest.mark.parametrize("value", ["0", -1, "two", 1.5, True])
def test_a_bad_gpu_request_names_the_allowed_forms(value):
    with pytest.raises(ValueError, match='must be "all", a count like 2, or "none"'):
        gpus.request(value)
    with pytest.raises(ConfigError, match='^option .gpus. must be "all", a count like 2'):
        cloudlab.Cluster(gpus=value)


@pytest.mark.skipif(HAS_GPU, reason="this machine has a GPU")
def test_gpus_all_without_a_gpu_says_so_in_one_sentence_and_starts_nothing():
    before = our_processes()
    with pytest.raises(ConfigError) as error:
        cloudlab.Cluster(gpus="all")
    message = str(error.value)
    assert message.startswith("--gpus all asks for GPUs, but this machine offers none (")
    assert message.endswith("): drop --gpus to run on CPU cores.") and message.count(". ") == 0
    assert our_processes() == before


FAKE = [gpus.Gpu(0, "Fake GPU A", "GPU-aaaa", 81_000.0), gpus.Gpu(1, "Fake GPU B", "GPU-bbbb",
                                                                  81_000.0)]


def test_choosing_gpus_for_a_cluster():
    assert gpus.choose("all", FAKE, "", None) == FAKE
    assert gpus.choose(1, FAKE, "", None) == FAKE[:1]
    assert gpus.choose("all", FAKE, "", 1) == FAKE[:1]  # start 1 --gpus all: the first
    with pytest.raises(ConfigError, match="asks for 3 GPUs, but only 2 are here: ask for at "
                                          "most 2, or --gpus all."):
        gpus.choose(3, FAKE, "", None)
    with pytest.raises(ConfigError, match="one engine per GPU: 4 engines on 2 GPUs cannot be; "
                                          "give 2 engines or none."):
        gpus.choose("all", FAKE, "", 4)


def _visible_devices():
    import os

    return os.environ.get("CUDA_VISIBLE_DEVICES")


def test_each_engine_sees_only_its_own_gpu_and_a_replacement_takes_the_dead_ones(engine,
                                                                              monkeypatch):
    monkeypatch.setattr(gpus, "detect", lambda: (FAKE, ""))
    monkeypatch.setattr(gpus, "usage", lambda indices: {
        i: gpus.GpuUsage(40.0 + i, 1000.0 * (i + 1), 81_000.0) for i in indices})
    with cloudlab.Cluster(gpus="all", engine=engine) as c:
        assert c.n == 2 and c.gpus == FAKE
        assert sorted(c.run(_visible_devices).values()) == ["0", "1"]
        rows = c.status()
        assert {r.gpu for r in rows} == {"0: Fake GPU A", "1: Fake GPU B"}
        assert {r.gpu_percent for r in rows} == {40.0, 41.0}
        text = status_view.render_text(status_view.snapshot(c))
        assert "GPU %" in text and "Fake GPU B" in text
        html = status_view.render_html(status_view.snapshot(c))
        assert "class='cl-gpu-percent'" in html
        victim = next(r for r in rows if r.gpu.startswith("1:"))
        os.kill(victim.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while ((victim.id in c.engine_ids or len(c._members.usable()) < 2)
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert victim.id not in c.engine_ids
        assert sorted(c.run(_visible_devices).values()) == ["0", "1"]
        with pytest.raises(ConfigError, match="one engine per GPU on 2 GPUs: scale it to 2"):
            c.scale(3)
    assert wait_until_gone(c.name) == []


def test_cpu_clusters_show_no_gpu_columns(cluster):
    text = status_view.render_text(status_view.snapshot(cluster))
    assert "GPU" not in text and "CPU %" in text


def test_counting_pi_on_gpus_needs_a_gpu_cluster(cluster):
    from cloudlab.workloads import pi

    with pytest.raises(ValueError, match="device='gpu' needs engines with GPUs: start the "
                                         "cluster with --gpus all"):
        pi.estimate(cluster, 1e6, device="gpu")
    assert pi.estimate(cluster, 1e6).device == "cpu"


# ------------------------------------------------------------------ on a real GPU
@needs_gpu
@skip_without_gpu
def test_the_gpu_kernel_counts_exactly_the_cpu_points():
    from cloudlab.workloads import pi

    key = pi.seed_key(5)
    for start, stop in [(0, 1), (0, 5_000_000), (pi.BLOCK - 7, 3 * pi.BLOCK + 11),
                        (10**9, 10**9 + 123_457)]:
        assert pi.count_inside_gpu(key, start, stop) == pi.count_inside(key, start, stop)


@needs_gpu
@skip_without_gpu
@pytest.mark.parametrize("engine_kind", ["ipyparallel", "dask"])
def test_a_gpu_cluster_estimates_pi_on_every_gpu(engine_kind):
    from cloudlab.workloads import pi

    with cloudlab.Cluster(gpus="all", engine=engine_kind) as c:
        assert len(c.engine_ids) == len(gpus.detect()[0])
        assert all(r.gpu for r in c.status())
        on_gpus = pi.estimate(c, 1e10, seed=3)
        on_cpus = pi.estimate(c, 1e8, seed=3, device="cpu")
        small = pi.estimate(c, 1e8, seed=3, device="gpu")
    assert on_gpus.device == "gpu" and abs(on_gpus.estimate - 3.141592653589793) < 5 * on_gpus.stderr
    assert small.inside == on_cpus.inside  # the same points, counted twice


def test_the_gpu_benchmark_says_when_there_is_nothing_to_measure():
    import subprocess
    import sys

    from conftest import ROOT

    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_figures.py")],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert done.stderr.startswith("No GPU here (") and "nothing to measure" in done.stderr

import math
import shutil
import subprocess

import numpy as np
import pytest

from cloudlab.workloads import pi


def test_numba_kernel_counts_exactly_what_numpy_reference_counts():
    key = pi.seed_key(11)
    for start, stop in [(0, 1), (0, 100_000), (123_456, 1_400_000)]:
        assert pi.count_inside(key, start, stop) == pi.count_inside_numpy(key, start, stop)


def test_numba_kernel_matches_the_reference_across_blocks_and_past_2_to_the_32():
    key, b = pi.seed_key(7), pi.BLOCK  # each block of samples has its own 32-bit key
    for start, stop in [(5, 5), (9, 3), (b - 3, b + 2), (3 * b - 17, 5 * b + 1),
                        (2**32 - 7, 2**32 + 11), (2**40 + 1, 2**40 + b + 2)]:
        assert pi.count_inside(key, start, stop) == pi.count_inside_numpy(key, start, stop)


def test_counts_add_up_whatever_the_split():
    key = pi.seed_key(3)
    whole = pi.count_inside(key, 0, 1_000_000)
    bounds = [0, 17, 250_000, 999_999, 1_000_000]
    assert sum(pi.count_inside(key, a, b) for a, b in zip(bounds, bounds[1:])) == whole


def test_different_seeds_give_different_streams_and_a_sane_fraction():
    counts = {pi.count_inside(pi.seed_key(s), 0, 200_000) for s in range(5)}
    assert len(counts) == 5
    for c in counts:
        assert abs(4 * c / 200_000 - math.pi) < 5 * 4 * math.sqrt(0.25 * 0.75 / 200_000) * 1.0


def test_estimate_on_a_cluster(cluster):
    result = pi.estimate(cluster, 4e7, seed=5)
    assert result.samples == 40_000_000 and result.engines == 3
    assert abs(result.estimate - math.pi) < 5 * result.stderr
    again = pi.estimate(cluster, 4e7, seed=5, tasks=7)
    assert again.inside == result.inside  # reproducible whatever the split
    assert "pi ~ 3.14" in str(result)
    assert np.isfinite(result.samples_per_s)


def test_live_convergence_plot_is_saved_as_a_png_in_an_executed_notebook():
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(c) for c in (
        "%load_ext cloudlab", "%cluster start 2",
        "from cloudlab.workloads import pi\nr = pi.estimate(cluster, 4e8, seed=1, plot=True)",
        "%cluster stop")])
    NotebookClient(nb, timeout=300, kernel_name="python3").execute()
    images = [o for o in nb.cells[2].outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1  # one figure, updated in place, not one per frame
    assert len(images[0].data["image/png"]) > 10_000


def test_convergence_history_shrinks_its_error():
    history = pi.Convergence()
    key = pi.seed_key(0)
    for a in range(0, 1_000_000, 100_000):
        history.add(100_000, pi.count_inside(key, a, a + 100_000))
    assert history.samples[-1] == 1_000_000
    assert history.stderrs[-1] < history.stderrs[0] / 3
    from matplotlib.figure import Figure

    fig = Figure()
    history.draw(fig)
    assert "after 1e+06 samples" in fig.axes[0].get_title()


# The CUDA kernel cannot run here (no GPU; tests/test_gpus.py runs it where there is one),
# but its arithmetic compiles for the CPU too: a C++ compiler checks it sample for sample
# against the NumPy reference, and nvcc checks that the kernel compiles for a GPU.
HARNESS = """
#define CLOUDLAB_HOST_TEST
#define __host__
#define __device__
#include "pi.cu"
#include <cstdio>
#include <cstdlib>
int main(int argc, char **argv) {
    for (int k = 1; k + 2 < argc; k += 3)
        printf("%u\\n", count_range(strtoull(argv[k], 0, 10), strtoull(argv[k + 1], 0, 10),
                                   strtoull(argv[k + 2], 0, 10)));
}
"""


def _tool(name):
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def test_the_cuda_kernels_arithmetic_counts_the_same_points_as_numpy(tmp_path):
    (tmp_path / "harness.cpp").write_text(HARNESS)
    binary = tmp_path / "harness"
    subprocess.run([_tool("g++"), "-O2", "-I", str(pi.KERNEL_SOURCE.parent), "-o", str(binary),
                    str(tmp_path / "harness.cpp")], check=True)
    key = pi.seed_key(7)
    ranges = [(0, 1), (0, 300_000), (pi.BLOCK - 5, pi.BLOCK + 5), (pi.BLOCK - 1000, 3 * pi.BLOCK + 7),
              (2**40 + 3, 2**40 + 200_003)]
    args = [str(v) for start, stop in ranges for v in (key, start, stop)]
    counts = [int(line) for line in subprocess.run([str(binary), *args], check=True,
                                                   capture_output=True, text=True).stdout.split()]
    assert counts == [pi.count_inside_numpy(key, a, b) for a, b in ranges]


def test_the_cuda_kernel_compiles_for_a_gpu(tmp_path):
    ptx = tmp_path / "pi.ptx"
    subprocess.run([_tool("nvcc"), "--ptx", "-arch=sm_90", "-o", str(ptx),
                    str(pi.KERNEL_SOURCE)], check=True)
    text = ptx.read_text()
    assert ".entry count_inside" in text and "shfl.sync.down" in text and "atom.global.add.u64" in text

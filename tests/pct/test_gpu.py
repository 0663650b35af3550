"""The GPU path of pCT, checked here without a GPU where that is possible.

The CUDA kernels' arithmetic (kernels/pct_paths.cu) compiles for the CPU too: built with a
C++ compiler, it must give the Numba kernels' rows exactly, for every path model; nvcc must
compile it for a GPU; and the gap-closing step the GPU runs (gpu.compact, written against an
array module) runs here on NumPy against the Numba pass it replaces. The tests marked ``gpu``
run the whole path on a real GPU and skip without one (CI has none).
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import numpy as np
import pytest

import cloudlab
from cloudlab import gpus
from cloudlab.workloads import pct
from cloudlab.workloads.pct import gpu, mlp, simulate, system
from cloudlab.workloads.pct.phantom import Grid, ctp404

HARNESS = """
#define CLOUDLAB_HOST_TEST
#define __host__
#define __device__
#include "pct_paths.cu"
extern "C" void count_all(const double *h, long long rows, const unsigned char *mask, int n,
                          double pixel, double tracker, double step, double *geometry) {
    for (long long r = 0; r < rows; ++r)
        count_history(h + r * FIELDS, mask, n, pixel, tracker, step, geometry + r * 6);
}
extern "C" void fill_all(const double *h, const double *geometry, long long rows, int n,
                         double pixel, int kind, const double *table, int n_lengths, int n_s,
                         double length_step, const long long *bound, int *indices,
                         float *chords, long long *lengths) {
    for (long long r = 0; r < rows; ++r)
        lengths[r] = fill_history(h + r * FIELDS, geometry + r * 6, n, pixel, kind, table,
                                  n_lengths, n_s, length_step, indices + bound[r],
                                  chords + bound[r]);
}
"""


@pytest.fixture(scope="module")
def host_kernels(tmp_path_factory):
    compiler = shutil.which("g++")
    if compiler is None:
        pytest.skip("g++ is not installed")
    folder = tmp_path_factory.mktemp("kernels")
    (folder / "harness.cpp").write_text(HARNESS)
    library = folder / "harness.so"
    subprocess.run([compiler, "-O2", "-shared", "-fPIC", "-I", str(gpu.KERNEL_SOURCE.parent),
                    "-o", str(library), str(folder / "harness.cpp")], check=True)
    return ctypes.CDLL(str(library))


def _pointer(array):
    return array.ctypes.data_as(ctypes.c_void_p)


@pytest.fixture(scope="module")
def scene():
    phantom, grid = ctp404(), Grid(128, 0.125)
    scan = simulate.Scan.around(phantom, 16.0)
    h = simulate.simulate_chunk(phantom, scan, 4, 0, 3000).astype(np.float64)
    yy, xx = np.mgrid[:grid.n, :grid.n]
    centre = (grid.n - 1) / 2
    hull = (xx - centre) ** 2 + (yy - centre) ** 2 < (0.47 * grid.n) ** 2
    table = mlp.build_table(max_length=mlp.table_length(grid.size), length_step=mlp.TABLE_STEP)
    return h, grid, scan, hull, table


@pytest.mark.parametrize("path", system.PATHS)
def test_the_cuda_kernels_build_the_numba_kernels_rows(host_kernels, scene, path):
    h, grid, scan, hull, table = scene
    count, fill, _ = system._kernels()
    step = grid.pixel / system.SAMPLES_PER_PIXEL
    expected_geometry = np.zeros((len(h), 6))  # rows missing the hull keep zeros
    count(h, hull, grid.n, grid.pixel, scan.tracker, step, expected_geometry)
    geometry = np.zeros((len(h), 6))
    mask = np.ascontiguousarray(hull, dtype=np.uint8)
    host_kernels.count_all(_pointer(h), ctypes.c_longlong(len(h)), _pointer(mask),
                           ctypes.c_int(grid.n), ctypes.c_double(grid.pixel),
                           ctypes.c_double(scan.tracker), ctypes.c_double(step),
                           _pointer(geometry))
    assert np.array_equal(geometry, expected_geometry)
    assert (geometry[:, 5] > 0).mean() > 0.9  # most histories cross the hull

    bound = np.concatenate([[0], np.cumsum(geometry[:, 5].astype(np.int64))])
    kind = system.PATHS.index(path)
    expected = [np.empty(bound[-1], np.int32), np.empty(bound[-1], np.float32),
                np.zeros(len(h), np.int64)]
    fill(h, geometry, grid.n, grid.pixel, kind, table, mlp.TABLE_STEP, bound, *expected)
    got = [np.empty(bound[-1], np.int32), np.empty(bound[-1], np.float32),
           np.zeros(len(h), np.int64)]
    host_kernels.fill_all(_pointer(h), _pointer(geometry), ctypes.c_longlong(len(h)),
                          ctypes.c_int(grid.n), ctypes.c_double(grid.pixel), ctypes.c_int(kind),
                          _pointer(table), ctypes.c_int(table.shape[0]),
                          ctypes.c_int(table.shape[1]), ctypes.c_double(mlp.TABLE_STEP),
                          _pointer(bound), *(_pointer(a) for a in got))
    assert np.array_equal(got[2], expected[2])  # pairs per row
    written = np.concatenate([np.arange(b, b + n) for b, n in zip(bound[:-1], expected[2])])
    assert np.array_equal(got[0][written], expected[0][written])
    assert np.array_equal(got[1][written], expected[1][written])


def test_closing_the_gaps_between_rows_as_the_gpu_does_matches_numba(scene):
    h, grid, scan, hull, table = scene
    blocks = system.build(h, np.arange(len(h)), hull, grid, scan.tracker, 1, table,
                          mlp.TABLE_STEP)
    # Rows written with gaps after them, some empty, as the fill pass leaves them.
    rng = np.random.default_rng(1)
    block = blocks[0]
    lengths = np.diff(block.indptr).astype(np.int64)
    lengths[rng.choice(lengths.size, 50, replace=False)] = 0
    room = lengths + rng.integers(0, 9, lengths.size)
    bound = np.concatenate([[0], np.cumsum(room)])
    indices = np.full(bound[-1], -1, np.int32)
    chords = np.full(bound[-1], np.nan, np.float32)
    for r, (start, n) in enumerate(zip(bound[:-1], lengths)):
        indices[start:start + n] = block.indices[block.indptr[r]:block.indptr[r] + n]
        chords[start:start + n] = block.chords[block.indptr[r]:block.indptr[r] + n]
    indptr, got_indices, got_chords, norms = gpu.compact(bound, lengths, indices, chords, np)
    _, _, compact_numba = system._kernels()
    expected_norms = np.zeros(lengths.size)
    k = compact_numba(bound, lengths, indices.copy(), chords.copy(), expected_norms)
    assert indptr.dtype == np.int32 and indptr[-1] == k == got_indices.size
    kept = lengths > 0
    assert np.array_equal(np.diff(indptr), lengths[kept])
    assert not np.isnan(got_chords).any() and (got_indices >= 0).all()
    # Numba squares the float32 chords in float32; the GPU path squares them in float64.
    np.testing.assert_allclose(norms, expected_norms[kept], rtol=1e-6)


class _OnTheCpu:
    """A host-compiled kernel called the way CuPy calls the CUDA one: (grid, block, args)."""

    def __init__(self, function):
        self.function = function

    def __call__(self, grid, block, args):
        self.function(*(self._argument(a) for a in args))

    @staticmethod
    def _argument(a):
        if isinstance(a, np.ndarray):
            assert a.flags["C_CONTIGUOUS"], "the kernels read arrays as flat rows"
            return _pointer(a)
        return {np.int64: ctypes.c_longlong, np.int32: ctypes.c_int,
                np.float64: ctypes.c_double}[type(a)](a)


@pytest.mark.parametrize("path", ["mlp", "spline"])
def test_the_gpu_build_gives_the_cpu_blocks_when_run_on_numpy(host_kernels, scene, path,
                                                              monkeypatch):
    """gpu.build with NumPy, SciPy and the kernels compiled for the CPU: the same blocks as
    system.build, block sums included, through several batches per block."""
    import scipy.sparse

    h, grid, scan, hull, table = scene
    gid = np.arange(len(h)) * 7 + 3
    monkeypatch.setattr(gpu, "BATCH", 211)
    kernels = (_OnTheCpu(host_kernels.count_all), _OnTheCpu(host_kernels.fill_all))
    on_gpu_path = gpu.build(h, gid, hull, grid, scan.tracker, 4, table, mlp.TABLE_STEP, path,
                            xp=np, sparse=scipy.sparse, kernels=kernels)
    on_cpu_path = system.build(h, gid, hull, grid, scan.tracker, 4, table, mlp.TABLE_STEP, path)
    x = np.random.default_rng(2).random(grid.n * grid.n)
    pixels = grid.n * grid.n
    for g, c in zip(on_gpu_path, on_cpu_path, strict=True):
        assert g.rows == c.rows > 0 and g.nonzeros == c.nonzeros
        assert g.matrix.indices.dtype == np.int32 and g.matrix.indptr.dtype == np.int32
        assert np.array_equal(g.matrix.indptr, c.indptr)
        assert np.array_equal(g.matrix.indices, c.indices)
        assert np.array_equal(g.matrix.data, c.chords)
        assert np.array_equal(g.wepl, c.wepl)
        np.testing.assert_allclose(g.norms, c.norms, rtol=1e-6)
        assert np.array_equal(g.crossings(pixels), c.crossings(pixels))
        a = c.matrix(pixels)
        expected = a.T @ ((c.wepl - a @ x.astype(np.float32)) / c.norms).astype(np.float32)
        np.testing.assert_allclose(g.block_sum(x), expected, rtol=1e-5,
                                   atol=1e-6 * np.abs(expected).max())


def test_the_pct_kernels_compile_for_a_gpu(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not installed")
    ptx = tmp_path / "pct.ptx"
    subprocess.run([nvcc, "--ptx", "-arch=sm_90", "-o", str(ptx), str(gpu.KERNEL_SOURCE)],
                   check=True)
    text = ptx.read_text()
    assert ".entry count_paths" in text and ".entry fill_paths" in text


def test_asking_for_the_gpu_path_without_a_gpu_names_the_fix(cluster):
    if gpu.available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="needs a GPU and CuPy in this process"):
        pct.reconstruct(None, "small", device="gpu")
    with pytest.raises(ValueError, match="start the cluster with --gpus all"):
        pct.reconstruct(cluster, "small", device="gpu")
    with pytest.raises(ValueError, match="device must be auto, cpu or gpu, not 'tpu'"):
        pct.reconstruct(None, "small", device="tpu")


# ------------------------------------------------------------------ on a real GPU
HAS_GPU = gpu.available() and bool(gpus.detect()[0])


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU with CuPy here")
def test_gpu_rows_and_block_sums_match_the_cpu(scene):
    h, grid, scan, hull, table = scene
    gid = np.arange(len(h))
    cpu_blocks = system.build(h, gid, hull, grid, scan.tracker, 3, table, mlp.TABLE_STEP)
    gpu_blocks = gpu.build(h, gid, hull, grid, scan.tracker, 3, table, mlp.TABLE_STEP)
    x = np.random.default_rng(0).random(grid.n * grid.n)
    for c, g in zip(cpu_blocks, gpu_blocks):
        assert g.rows == c.rows and abs(g.nonzeros - c.nonzeros) <= c.nonzeros // 1000
        a = c.matrix(grid.n * grid.n)
        r = (c.wepl - a @ x.astype(np.float32)) / c.norms
        expected = a.T @ r.astype(np.float32)
        np.testing.assert_allclose(g.block_sum(x), expected, rtol=1e-3,
                                   atol=1e-4 * np.abs(expected).max())


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_GPU, reason="no NVIDIA GPU with CuPy here")
def test_small_reconstruction_on_a_gpu_cluster_meets_the_thresholds_and_the_cpu_image():
    with cloudlab.Cluster(1, gpus=1) as c:
        on_gpu_run = pct.reconstruct(c, "small", device="gpu")
        on_cpu_run = pct.reconstruct(c, "small", device="cpu")
    f = on_gpu_run.figures
    assert f["max_insert_error_pct"] <= 1.0 and f["air_max_abs"] <= 0.03
    assert on_gpu_run.figures_plain["noise_pct"] <= 1.5 and f["noise_pct"] <= 1.0
    scale = np.abs(on_cpu_run.image).max()
    assert np.abs(on_gpu_run.image - on_cpu_run.image).max() <= 1e-3 * scale

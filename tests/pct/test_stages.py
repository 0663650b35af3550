"""pCT stages on their own: phantoms, simulator, cuts, FBP, rows, DROP, metrics."""

import math

import numpy as np
import pytest

from cloudlab.workloads.pct import cuts, fbp, metrics, simulate, solve, system
from cloudlab.workloads.pct import mlp as mlp_module
from cloudlab.workloads.pct.phantom import Grid, ctp404, shepp_logan


def test_ctp404_has_the_inserts_of_the_brief_at_their_places():
    p = ctp404()
    assert p.rsp(0.0, 0.0) == 1.0 and p.rsp(7.6, 0.0) == 0.0
    teflon = p.rsp(5.85 * math.cos(math.radians(60)), 5.85 * math.sin(math.radians(60)))
    assert teflon == pytest.approx(1.838)
    assert [r.rsp for r in p.rois] == [1.354, 1.838, 0.0014, 0.869, 0.9973, 1.0386, 0.0014, 1.155]
    image = p.raster(Grid(128, 0.125))
    # The RSP integrated over the image is the body's plus each insert's difference from it.
    integral = math.pi * 7.5**2 + sum((r.rsp - 1) * math.pi * 0.61**2 for r in p.rois)
    assert image.sum() * 0.125**2 == pytest.approx(integral, rel=0.002)


def test_shepp_logan_regions_have_the_brief_values():
    p = shepp_logan()
    assert p.rsp(0.0, 9.0) == pytest.approx(1.65)  # skull
    assert {r.name: round(r.rsp, 4) for r in p.rois} == {
        "brain": 1.04, "left ventricle": 1.0, "right ventricle": 1.0, "upper feature": 1.06}


def test_simulated_chunks_are_reproducible_and_independent():
    p, scan = ctp404(), simulate.Scan.around(ctp404(), 16.0)
    a = simulate.simulate_chunk(p, scan, 3, 5, 2000)
    assert np.array_equal(a, simulate.simulate_chunk(p, scan, 3, 5, 2000))
    assert not np.array_equal(a, simulate.simulate_chunk(p, scan, 3, 6, 2000))
    assert simulate.chunk_sizes(70_000) == [32768, 32768, 4464]


def test_wepl_is_the_chord_through_the_body_and_scattering_follows_highland():
    """At 30 and 210 degrees a path near the centre crosses no insert: its WEPL is the
    body's chord 2 sqrt(R^2 - t^2), and its angle spreads as the MLP's law predicts."""
    p = ctp404()
    scan = simulate.Scan.around(p, 16.0)
    h = simulate.simulate_chunk(p, scan, 0, 0, 100_000)
    t = h[:, cuts.T_IN]
    near = (np.abs(t) < 1.0) & (np.abs(np.sin(h[:, cuts.PHI] - math.pi / 6)) < 0.1)
    assert near.sum() > 500
    chord = 2 * np.sqrt(7.5**2 - t[near] ** 2)
    assert np.median(h[near, cuts.WEPL] - chord) == pytest.approx(0.0, abs=0.03)
    dtheta = h[near, cuts.THETA_OUT] - h[near, cuts.THETA_IN]
    spread = 1.4826 * np.median(np.abs(dtheta - np.median(dtheta)))
    # MAD counts the nuclear-like events a little (about +4%, measured in plain water).
    assert spread == pytest.approx(1.04 * mlp_module.exit_spread(15.0)[1], rel=0.1)


def _synthetic(n, rng, outliers=0.02):
    """Histories with WEPL ~ N(10 + t, 0.2) and angle change ~ N(0, 10 mrad) per bin, plus
    outliers far off in WEPL."""
    h = np.zeros((n, 6), np.float32)
    h[:, cuts.PHI] = rng.uniform(0, 2 * math.pi, n)
    h[:, cuts.T_IN] = rng.uniform(-2, 2, n)
    h[:, cuts.THETA_OUT] = rng.normal(0, 0.01, n)
    h[:, cuts.WEPL] = 10 + h[:, cuts.T_IN] + rng.normal(0, 0.2, n)
    bad = rng.random(n) < outliers
    h[bad, cuts.WEPL] += rng.uniform(3, 8, bad.sum())
    return h, bad


def test_robust_cuts_find_the_median_and_drop_outliers_the_same_on_any_split():
    rng = np.random.default_rng(1)
    h, bad = _synthetic(200_000, rng)
    binning = cuts.Binning(fov=4.0, angle_bins=10, t_step=0.5)
    whole = cuts.robust_cuts(binning, lambda level: cuts.histogram(h, binning, level))
    parts = np.array_split(h, 3)
    split = cuts.robust_cuts(binning, lambda level: sum(cuts.histogram(p, binning, level)
                                                        for p in parts))
    assert np.array_equal(whole.centre, split.centre) and np.array_equal(whole.sigma, split.sigma)
    # The centres are the bins' medians, to the refinement's resolution.
    bins = binning.index(h)
    for b in (0, 17, 55):
        assert whole.centre[0, b] == pytest.approx(np.median(h[bins == b, cuts.WEPL]), abs=0.01)
    assert np.nanmedian(whole.sigma[0]) == pytest.approx(0.2 * math.sqrt(1 + (0.5 / 0.2) ** 2 / 12),
                                                         rel=0.1)
    kept = cuts.keep(h, binning, whole)
    assert not kept[bad].any()  # every outlier went
    assert kept[~bad].mean() > 0.99  # and 3 sigma keeps nearly all the rest


def test_mean_and_sigma_cuts_would_keep_outliers_that_robust_cuts_drop():
    """Why the cuts are robust: with 5% outliers, mean +- 3 SD keeps many of them."""
    rng = np.random.default_rng(2)
    h, bad = _synthetic(100_000, rng, outliers=0.05)
    binning = cuts.Binning(fov=4.0, angle_bins=10, t_step=0.5)
    bins = binning.index(h)
    w = h[:, cuts.WEPL]
    mean = np.bincount(bins, w, binning.size) / np.bincount(bins, minlength=binning.size)
    sd = np.sqrt(np.bincount(bins, (w - mean[bins]) ** 2, binning.size)
                 / np.bincount(bins, minlength=binning.size))
    naive_kept = np.abs(w - mean[bins]) <= 3 * sd[bins]
    robust = cuts.robust_cuts(binning, lambda level: cuts.histogram(h, binning, level))
    assert naive_kept[bad].mean() > 0.2
    assert cuts.keep(h, binning, robust)[bad].mean() == 0.0


def test_shepp_logan_filter_keeps_the_dc_term_so_a_disc_reconstructs_unbiased():
    """FBP of exact parallel projections of a uniform disc returns its value."""
    grid = Grid(96, 0.2)
    geometry = fbp.Sinogram.for_grid(grid, 20.0)
    t = grid.centres()
    radius, value = 7.0, 1.0
    chord = 2 * np.sqrt(np.clip(radius**2 - t**2, 0, None)) * value
    sums = np.stack([np.tile(chord, (geometry.angles, 1)), np.ones(geometry.shape)])
    image = fbp.reconstruct(sums, geometry)
    x, y = grid.xy()
    centre = x**2 + y**2 < 5.0**2
    assert image[centre].mean() == pytest.approx(value, abs=0.003)
    ring = (x**2 + y**2 > 8.0**2) & (x**2 + y**2 < 9.5**2)  # outside the disc, inside the scan
    assert abs(image[ring]).max() < 0.05
    hull = fbp.hull(image)
    assert hull[x**2 + y**2 < 6.8**2].all() and not hull[x**2 + y**2 > 7.6**2].any()


def test_a_straight_proton_through_a_full_hull_has_chords_summing_to_its_length():
    grid = Grid(16, 1.0)
    hull = np.ones((16, 16), bool)
    tracker = 20.0
    h = np.array([[0.0, 0.3, 0.0, 0.3, 0.0, 10.0],  # along +x at y = 0.3
                  [math.pi / 2, -2.5, 0.0, -2.5, 0.0, 10.0]])  # along +y at x = 2.5
    table = mlp_module.build_table(max_length=25.0, length_step=mlp_module.TABLE_STEP)
    [block] = system.build(h, np.arange(2), hull, grid, tracker, 1, table, mlp_module.TABLE_STEP)
    a = block.matrix(grid.n * grid.n).toarray()
    assert a.sum(axis=1) == pytest.approx([16.0, 16.0], abs=0.5 + 1e-9)
    row0 = np.nonzero(a[0])[0]
    assert set(row0 // 16) == {8}  # y = 0.3 is pixel row 8; every column crossed once
    assert len(row0) == 16
    assert set(np.nonzero(a[1])[0] % 16) == {10}  # at 90 degrees x = -t = 2.5: column 10
    assert block.norms == pytest.approx((a**2).sum(axis=1))
    # A proton that does not scatter has the same row whatever the path model.
    for path in ("spline", "straight"):
        [other] = system.build(h, np.arange(2), hull, grid, tracker, 1, table,
                               mlp_module.TABLE_STEP, path)
        assert np.abs(other.matrix(grid.n * grid.n).toarray() - a).max() < 1e-4
    with pytest.raises(ValueError, match="Unknown path 'curly': choose one of mlp, spline"):
        system.build(h, np.arange(2), hull, grid, tracker, 1, table, mlp_module.TABLE_STEP,
                     "curly")


def test_blocks_are_a_function_of_global_ids_only():
    gid = np.arange(100_000)
    b = system.block_of(gid, 20)
    assert np.array_equal(b[5000:6000], system.block_of(gid[5000:6000], 20))
    counts = np.bincount(b, minlength=20)
    assert counts.min() > 4500 and counts.max() < 5500


def test_drop_solves_a_consistent_system_and_tv_gradient_is_the_derivative():
    rng = np.random.default_rng(0)
    truth = np.zeros((12, 12))
    truth[3:9, 3:9] = 1.0
    a = rng.random((600, 144)) * (rng.random((600, 144)) < 0.15)
    b = a @ truth.ravel()
    blocks = rng.integers(0, 5, 600)
    crossings = np.stack([(a[blocks == t] > 0).sum(axis=0) for t in range(5)])
    norms = (a**2).sum(axis=1)

    def block_sum(t, x):
        rows = blocks == t
        return a[rows].T @ ((b[rows] - a[rows] @ x) / norms[rows])

    x = solve.drop(np.zeros((12, 12)), np.ones((12, 12), bool), crossings, block_sum,
                   solve.Drop(blocks=5, relaxation=1.0, cycles=60, tv_steps=0))
    assert np.abs(x - truth).max() < 0.02
    # SART over all rows at once reaches the same image.
    row_sums = a.sum(axis=1)
    y = solve.sart(np.zeros((12, 12)), np.ones((12, 12), bool), a.sum(axis=0),
                   lambda x: a.T @ ((b - a @ x) / row_sums), relaxation=1.0, iterations=300)
    assert np.abs(y - truth).max() < 0.02
    x0 = rng.random((6, 6))
    g = solve.tv_gradient(x0)
    e = np.zeros_like(x0)
    e[2, 3] = 1e-6
    numeric = (solve.total_variation(x0 + e) - solve.total_variation(x0 - e)) / 2e-6
    assert g[2, 3] == pytest.approx(numeric, rel=1e-4)


def test_figures_of_the_truth_are_perfect_and_of_a_blurred_truth_show_a_wider_edge():
    p, grid = ctp404(), Grid(128, 0.125)
    truth = p.raster(grid, oversample=8)
    f = metrics.figures(truth, grid, p, truth)
    assert f["max_insert_error_pct"] < 0.01 and f["air_max_abs"] < 0.002
    assert f["rmse"] == 0.0 and f["noise_pct"] < 1e-9
    blurred = truth.copy()
    for _ in range(3):
        blurred = (np.roll(blurred, 1, 0) + np.roll(blurred, -1, 0) + np.roll(blurred, 1, 1)
                   + np.roll(blurred, -1, 1) + blurred) / 5
    assert metrics.figures(blurred, grid, p, truth)["edge_mm"] > f["edge_mm"] + 0.5


def test_mlp_follows_true_water_tracks_twice_as_well_as_the_straight_chord():
    depths, t, theta = simulate.water_tracks(20_000, 20.0, seed=3)
    mid = len(depths) // 2
    y0 = (t[:, 0], theta[:, 0])
    y2 = (t[:, -1], theta[:, -1])
    t_mlp, _ = mlp_module.mlp(y0, y2, 20.0, depths[mid])
    chord = (t[:, 0] + t[:, -1]) / 2
    mlp_error = np.sqrt(np.mean((t_mlp - t[:, mid]) ** 2))
    assert mlp_error == pytest.approx(mlp_module.mlp_error(20.0, 10.0), rel=0.06)
    assert np.sqrt(np.mean((chord - t[:, mid]) ** 2)) > 1.8 * mlp_error

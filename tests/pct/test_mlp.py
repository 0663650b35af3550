import math
import time

import numba
import numpy as np
import pytest

from cloudlab.workloads.pct import mlp

STEP = 0.05  # cm between tabulated lengths


@pytest.fixture(scope="module")
def table():
    return mlp.build_table(max_length=20.0, length_step=STEP, s_nodes=201)


@numba.njit(cache=True)
def _table_paths(table, length_step, length, s, t0, th0, t2, th2):
    """table_mlp called from inside a Numba kernel, one point at a time, as path builders do."""
    t, theta = np.empty(length.size), np.empty(length.size)
    for k in range(length.size):
        t[k], theta[k] = mlp.table_mlp(table, length_step, length[k], s[k], t0[k], th0[k], t2[k],
                                       th2[k])
    return t, theta


def _random_histories(rng, n, low, high):
    """Lengths in [low, high], depths, and entries/exits with the spreads real protons have."""
    length = rng.uniform(low, high, n)
    s = rng.uniform(0.0, 1.0, n)
    t0, th0 = rng.uniform(-8.0, 8.0, n), rng.normal(0.0, 0.03, n)
    sigma_t, sigma_theta = mlp.exit_spread(length)
    t2 = t0 + length * th0 + sigma_t * rng.standard_normal(n)
    th2 = th0 + sigma_theta * rng.standard_normal(n)
    return length, s, t0, th0, t2, th2


def test_exit_spread_of_a_pencil_beam_after_20_cm_of_water():
    sigma_t, sigma_theta = mlp.exit_spread(20.0)
    assert sigma_t == pytest.approx(0.360, rel=0.005)
    assert sigma_theta == pytest.approx(0.0385, rel=0.005)


def test_scattering_covariance_is_vectorised_and_vanishes_on_empty_intervals():
    sigma = mlp.scattering_covariance(np.zeros((3, 1)), np.array([5.0, 10.0, 20.0]))
    assert sigma.shape == (3, 3, 2, 2)
    assert sigma[0, 2] == pytest.approx(mlp.scattering_covariance(0.0, 20.0))
    assert np.all(mlp.scattering_covariance(7.0, 7.0) == 0.0)
    later = mlp.scattering_covariance(10.0, 15.0)[0, 0]
    earlier = mlp.scattering_covariance(0.0, 5.0)[0, 0]
    assert later > 1.5 * earlier  # slower protons scatter more


def test_mlp_error_at_mid_depth_and_ends():
    assert mlp.mlp_error(20.0, 10.0) == pytest.approx(0.051, abs=0.001)
    assert np.all(mlp.mlp_error(20.0, np.array([0.0, 20.0])) < 1e-9)
    errors = mlp.mlp_error(20.0, np.array([5.0, 15.0]))
    assert errors[1] > errors[0]  # the exit is the noisier end


def test_stable_form_equals_the_form_with_inverses():
    inv = np.linalg.inv
    y0, y2 = np.array([0.3, 0.02]), np.array([0.9, 0.05])
    for length, depth in [(20.0, 7.3), (12.0, 1.0), (3.0, 2.9)]:
        sigma1 = mlp.scattering_covariance(0.0, depth)
        sigma2 = mlp.scattering_covariance(depth, length)
        r0 = np.array([[1.0, depth], [0.0, 1.0]])
        r1 = np.array([[1.0, length - depth], [0.0, 1.0]])
        error = inv(inv(sigma1) + r1.T @ inv(sigma2) @ r1)
        expected = error @ (inv(sigma1) @ r0 @ y0 + r1.T @ inv(sigma2) @ y2)
        assert np.allclose(mlp.mlp(y0, y2, length, depth), expected, rtol=1e-9, atol=1e-12)
        assert mlp.mlp_error(length, depth) == pytest.approx(math.sqrt(error[0, 0]), rel=1e-9)


def test_paths_start_at_the_entry_and_end_at_the_exit(table):
    y0, y2 = (0.3, 0.02), (0.9, 0.05)
    for length in [0.0, 1e-4, 0.5, 7.3, 20.0, 30.0]:
        if length > 0.0:
            t, theta = mlp.mlp(y0, y2, length, np.array([0.0, length]))
            assert np.allclose(t, [0.3, 0.9], rtol=0, atol=1e-12)
            assert np.allclose(theta, [0.02, 0.05], rtol=0, atol=1e-12)
        assert mlp.table_mlp(table, STEP, length, 0.0, *y0, *y2) == (0.3, 0.02)
        assert mlp.table_mlp(table, STEP, length, 1.0, *y0, *y2) == (0.9, 0.05)


def test_mlp_broadcasts_over_protons_and_depths():
    t0, th0 = np.array([[0.0], [1.0]]), np.array([[0.0], [0.01]])
    t2, th2 = np.array([[0.5], [1.2]]), np.array([[0.02], [0.03]])
    depth = np.linspace(0.0, 15.0, 7)
    t, theta = mlp.mlp((t0, th0), (t2, th2), 15.0, depth)
    assert t.shape == theta.shape == (2, 7)
    single_t, single_theta = mlp.mlp((1.0, 0.01), (1.2, 0.03), 15.0, depth[3])
    assert (t[1, 3], theta[1, 3]) == pytest.approx((single_t, single_theta), rel=1e-12)


def test_table_shape_build_time_and_identities(table):
    start = time.perf_counter()
    mlp.build_table()
    assert time.perf_counter() - start < 1.0
    assert table.shape == (401, 201, 8) and table.dtype == np.float64
    assert np.all(table[:, 0] == mlp.IDENTITY_AT_ENTRY)
    assert np.all(table[:, -1] == mlp.IDENTITY_AT_EXIT)
    assert np.all(np.isfinite(table))


@pytest.mark.parametrize("seed, shortest, longest, t_tolerance, theta_tolerance", [
    (7, 0.5, 20.0, 0.0005, 0.0002),  # docs/pct.md section 4: about 0.0003 cm
    (8, 0.0, 0.5, 1e-5, 0.001),  # short paths, down to zero length
])
def test_table_matches_the_direct_form(table, seed, shortest, longest, t_tolerance,
                                       theta_tolerance):
    rng = np.random.default_rng(seed)
    histories = _random_histories(rng, 100_000, shortest, longest)
    length, s, t0, th0, t2, th2 = histories
    t, theta = _table_paths(table, STEP, *histories)
    direct_t, direct_theta = mlp.mlp((t0, th0), (t2, th2), length, s * length)
    assert np.abs(t - direct_t).max() <= t_tolerance
    assert np.abs(theta - direct_theta).max() <= theta_tolerance


def test_table_coefficients_and_a_zero_length_path(table):
    coefficients = mlp.table_coefficients(table, STEP, 12.34, 0.567)
    assert np.allclose(coefficients, mlp.mlp_coefficients(12.34, 0.567), rtol=0, atol=1e-3)
    t, theta = mlp.table_mlp(table, STEP, 0.0, 0.5, 0.3, 0.02, 0.3, 0.05)
    assert t == pytest.approx(0.3) and math.isfinite(theta)


def test_spline_path_hits_its_ends_along_its_directions():
    p0, p2 = np.array([0.0, 1.0]), np.array([18.0, 1.5])
    d0 = np.array([math.cos(0.01), math.sin(0.01)])
    d2 = np.array([math.cos(0.04), math.sin(0.04)])
    points = mlp.spline_path(p0, d0, p2, d2, 18.2, np.array([0.0, 1e-6, 1.0 - 1e-6, 1.0]))
    assert points.shape == (4, 2)
    assert np.allclose(points[0], p0, rtol=0, atol=1e-12)
    assert np.allclose(points[3], p2, rtol=0, atol=1e-12)
    start, end = points[1] - points[0], points[3] - points[2]
    assert np.allclose(start / np.linalg.norm(start), d0, atol=1e-6)
    assert np.allclose(end / np.linalg.norm(end), d2, atol=1e-6)


# ----------------------------------------------------------------- Monte Carlo in 20 cm of water
WATER, DU = 20.0, 0.1


@pytest.fixture(scope="module")
def water():
    """2e5 protons through 20 cm of water in 1 mm steps, by docs/pct.md section 7's stepping law
    (rho = 1): entry and exit (t, theta), path length, and the true t at 5, 10 and 15 cm."""
    rng = np.random.default_rng(2008)
    n = 200_000
    t0, th0 = rng.uniform(-5.0, 5.0, n), rng.normal(0.0, 0.002, n)
    t, theta, w = t0.copy(), th0.copy(), np.zeros(n)
    c = mlp.E0**2 * (1.0 + 0.038 * math.log(WATER / mlp.X0)) ** 2 / mlp.X0
    inside = {}
    for k in range(1, round(WATER / DU) + 1):
        tan = np.tan(theta)
        ds = DU * np.sqrt(1.0 + tan * tan)
        sigma = np.sqrt(c * np.polynomial.polynomial.polyval(w + ds / 2, mlp.SCHULTE) * ds)
        z1, z2 = rng.standard_normal((2, n))
        t += DU * tan + ds * sigma * (z1 / math.sqrt(12.0) + z2 / 2)
        theta += sigma * z2
        w += ds
        if k % 50 == 0:
            inside[round(k * DU)] = t.copy()
    return dict(t0=t0, th0=th0, t2=t, th2=theta, wepl=w, inside=inside)


def _mlp_rms_error(water, depth):
    t, _ = mlp.mlp((water["t0"], water["th0"]), (water["t2"], water["th2"]), WATER, depth)
    return np.sqrt(np.mean((water["inside"][depth] - t) ** 2))


def test_monte_carlo_exit_spreads_match_the_analytic_ones(water):
    sigma_t, sigma_theta = mlp.exit_spread(WATER)
    lateral = water["t2"] - water["t0"] - WATER * np.tan(water["th0"])
    assert np.std(lateral) == pytest.approx(sigma_t, rel=0.02)
    assert np.std(water["th2"] - water["th0"]) == pytest.approx(sigma_theta, rel=0.02)


def test_monte_carlo_mlp_error(water):
    assert _mlp_rms_error(water, 10) == pytest.approx(0.053, abs=0.003)
    assert _mlp_rms_error(water, 5) == pytest.approx(0.029, abs=0.003)
    assert _mlp_rms_error(water, 15) == pytest.approx(0.042, abs=0.003)
    chord = water["t0"] + (water["t2"] - water["t0"]) / 2
    assert np.sqrt(np.mean((water["inside"][10] - chord) ** 2)) > 1.8 * _mlp_rms_error(water, 10)


def test_monte_carlo_spline_error_is_close_to_the_mlp_error(water):
    n = water["t0"].size
    p0 = np.stack([np.zeros(n), water["t0"]], -1)
    p2 = np.stack([np.full(n, WATER), water["t2"]], -1)
    d0 = np.stack([np.cos(water["th0"]), np.sin(water["th0"])], -1)
    d2 = np.stack([np.cos(water["th2"]), np.sin(water["th2"])], -1)

    def point(s):
        return mlp.spline_path(p0, d0, p2, d2, water["wepl"], s)

    s = np.full(n, 0.5)
    for _ in range(4):  # Newton's method for the parameter at depth 10 cm
        u = point(s)[:, 0]
        slope = (point(s + 1e-6)[:, 0] - u) / 1e-6
        s -= (u - 10.0) / slope
    at_10 = point(s)
    assert np.abs(at_10[:, 0] - 10.0).max() < 1e-9
    spline_error = np.sqrt(np.mean((water["inside"][10] - at_10[:, 1]) ** 2))
    assert spline_error == pytest.approx(_mlp_rms_error(water, 10), rel=0.10)

"""pCT through the cloudlab API: the same image on 1, 2 and 4 engines of either kind, and
the acceptance run of docs/pct.md section 7 (small size, 2 engines)."""

import json

import numpy as np
import pytest

import cloudlab
from cloudlab.workloads import pct
from cloudlab.workloads.pct import solve
from conftest import ROOT, wait_until_gone

TINY = pct.Size("ctp404", 32, 0.5, 16.0, 70_000)  # three chunks: 1, 2 and 4 engines split them unevenly
TINY_DROP = solve.Drop(blocks=4, relaxation=0.5, cycles=2, tv_steps=2)


@pytest.fixture(scope="module")
def serial():
    return pct.reconstruct(None, TINY, seed=7, drop=TINY_DROP)


@pytest.mark.parametrize("engines", [1, 2, 4])
def test_the_image_does_not_depend_on_the_engine_count(serial, engine, engines):
    with cloudlab.Cluster(engines, engine=engine) as c:
        result = pct.reconstruct(c, TINY, seed=7, drop=TINY_DROP)
    assert wait_until_gone(c.name, 5) == []
    assert result.kept == serial.kept and result.rows == serial.rows
    assert result.nonzeros == serial.nonzeros
    for mine, theirs in ((result.fbp, serial.fbp), (result.image, serial.image)):
        assert np.abs(mine - theirs).max() <= 1e-5 * np.abs(theirs).max()


def test_a_lost_share_is_named_not_silently_skipped(engine):
    """An engine that leaves mid-run takes its histories with it: the run says so."""
    from cloudlab.workloads.pct import share

    with cloudlab.Cluster(2, engine=engine) as c:
        shares = pct.Shares(c)
        shares.map(share.simulate_chunk, [(pct.phantom.ctp404(), pct.simulate.Scan(16.0, 13.0),
                                           0, k, 100) for k in range(4)])
        c.run(share.forget, shares.run)  # as if every engine had been replaced
        with pytest.raises(RuntimeError, match=r"chunks \[0, 1, 2, 3\] were lost"):
            shares.total(share.sinogram, 4, None)


def test_acceptance_small_ctp404_on_two_engines(engine):
    """docs/pct.md section 7, small size, 2 engines on 2 cores: every threshold."""
    with cloudlab.Cluster(2, engine=engine) as c:
        result = pct.reconstruct(c, "small", seed=0)
    f = result.to_dict()
    (ROOT / "test-artifacts").mkdir(exist_ok=True)
    (ROOT / "test-artifacts" / f"pct-small-{engine}.json").write_text(json.dumps(f, indent=1))
    assert f["histories"] == 900_000
    assert f["max_insert_error_pct"] <= 1.0
    assert f["air_max_abs"] <= 0.03
    assert f["body_error_pct"] <= 0.5
    assert f["noise_pct"] <= 1.5 and f["noise_tv_pct"] <= 1.0
    assert f["rmse"] <= 0.040 and f["rmse"] < f["rmse_fbp"]
    assert f["edge_mm"] <= 2.5 and f["edge_mm"] < f["edge_fbp_mm"]
    assert f["peak_memory_gb"] < 4.0
    # Timing is the benchmark's (benchmarks/RESULTS.md), not a test's: only sanity here.
    assert 0 < f["seconds_excluding_simulation"] < 600

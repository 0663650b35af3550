"""Against a real cloud account, opt-in: `pytest --run-cloud tests/cloud/test_live_cloud.py`
(CLOUDLAB_LIVE_PROFILES=aws-cpu,azure chooses the profiles; default aws-cpu). These create
VMs, which costs money (a few cents a run with the default profiles), and use your
credentials. Without --run-cloud they are not collected.

What they check is what the offline tests check against moto_server and the replayed Azure
Resource Manager, on the real thing: the preflight passes, engines start and work, the cost
is known, stop leaves nothing running, and after kill -9 of the client gc leaves nothing."""

import os
import subprocess
import sys

import pytest

import cloudlab
from conftest import wait_until_gone

pytestmark = pytest.mark.live_cloud
PROFILES = os.environ.get("CLOUDLAB_LIVE_PROFILES", "aws-cpu").split(",")


def _cloudlab(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cloudlab.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def _leftovers(profile: str, cluster: str) -> list[str]:
    done = _cloudlab("gc", "--profile", profile, "--dry-run")
    assert done.returncode == 0, done.stderr
    return [line for line in done.stdout.splitlines() if cluster in line]


@pytest.fixture(params=PROFILES)
def profile(request):
    return request.param


def test_doctor_passes(profile):
    done = _cloudlab("doctor", "--profile", profile, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_engines_start_work_cost_and_leave_nothing(profile):
    with cloudlab.Cluster(2, profile=profile, engines_per_instance=1) as c:
        assert c.map(lambda x: x * x, range(10)) == [x * x for x in range(10)]
        cost = c.cost()
        assert cost.instances == 2
        assert cost.dollars_per_hour is None or cost.dollars_per_hour > 0
    assert wait_until_gone(c.name, 10) == []
    assert _leftovers(profile, c.name) == []


def test_after_kill_9_of_the_client_gc_leaves_nothing(profile):
    from cloud_vms import killed_after_start

    name = killed_after_start({"profile": profile, "engines_per_instance": 1}, 1,
                              lambda name: None)
    done = _cloudlab("gc", "--profile", profile)
    assert done.returncode == 0, done.stderr
    assert any(name in line for line in done.stdout.splitlines()), done.stdout
    assert _leftovers(profile, name) == []

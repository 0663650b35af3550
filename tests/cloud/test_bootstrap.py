"""The VM bootstrap script, rendered and then executed for real by bash on this machine:
its hard and idle expiry call `shutdown` (a stand-in on PATH records the calls), its
marker says when the boot is done; and the tags and cost figures every cloud shares."""

import datetime as dt
import os
import signal
import subprocess
import time

import pytest

from cloudlab.backends._vm import (
    USER_DATA_LIMIT,
    Bootstrap,
    booted_marker,
    cost,
    expired,
    expires_at,
    render_bootstrap,
    tags,
)


def _bootstrap(tmp_path, **overrides) -> Bootstrap:
    options = {"cluster": "ipp-abc123", "install": "echo installing >> \"$0.install\"",
               "idle_timeout": 2, "max_hours": 1.5, "instance_id_command": "echo i-0abc",
               "check_every": 0.2, "state_dir": str(tmp_path / "state")}
    return Bootstrap(**{**options, **overrides})


def test_the_script_is_small_and_holds_no_secret(tmp_path):
    script = render_bootstrap(_bootstrap(tmp_path, state_dir="/var/lib/cloudlab"))
    assert script.startswith("#!/bin/bash\n")
    assert len(script.encode()) < USER_DATA_LIMIT / 4
    for secret in ("PRIVATE KEY", "aws_secret_access_key", "AWS_SECRET", "curve_secretkey",
                   '"key":'):
        assert secret not in script
    assert 'shutdown -P +90 "cloudlab: ipp-abc123 reached its max_hours"' in script
    assert '-gt 2 ]' in script


@pytest.mark.parametrize("profile", ["aws-cpu", "aws-gpu-spot", "azure"])
def test_no_profile_installs_the_name_cloudlab_from_an_index(profile):
    """On the public index, cloudlab is another project: VMs get this client's own wheel
    over SSH (backends/environment.py), never a package by that name from an index."""
    import re

    from cloudlab.profiles import load_profile

    options = load_profile(profile).backend_options
    script = render_bootstrap(Bootstrap(profile, options.install, options.idle_timeout,
                                        options.max_hours, "echo i-0abc"))
    installs = [line for line in script.splitlines() if re.search(r"\b(pip|uv|conda)\b", line)]
    assert not any(re.search(r"(?<![\w/.+-])cloudlab(?![\w-])", line) for line in installs)
    assert "pip install" not in script  # nothing from an index at boot: packages come later
    assert options.packages == "index" and options.environment == "managed"


def test_an_install_over_the_user_data_limit_says_so(tmp_path):
    with pytest.raises(ValueError, match="over the 16 KB user-data limit: shorten the "
                                         "profile's install commands"):
        render_bootstrap(_bootstrap(tmp_path, install="echo x\n" * 3000))


@pytest.fixture
def fake_shutdown(tmp_path):
    """A `shutdown` on PATH that records its arguments, one call a line."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "shutdown-calls"
    (bin_dir / "shutdown").write_text(f"#!/bin/sh\necho \"$*\" >> {calls}\n")
    (bin_dir / "shutdown").chmod(0o755)
    return bin_dir, calls


def _run_bootstrap(tmp_path, fake_shutdown, **overrides):
    bin_dir, calls = fake_shutdown
    script = tmp_path / "user-data"
    script.write_text(render_bootstrap(_bootstrap(tmp_path, **overrides)))
    script.chmod(0o700)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    done = subprocess.run([str(script)], env=env, timeout=30, start_new_session=True)
    assert done.returncode == 0
    return calls


def _calls(calls) -> list[str]:
    return calls.read_text().splitlines() if calls.exists() else []


def test_a_vm_powers_off_once_its_lease_is_idle_and_not_before(tmp_path, fake_shutdown):
    calls = _run_bootstrap(tmp_path, fake_shutdown)
    state = tmp_path / "state"
    try:
        assert (state / "booted-i-0abc").exists()  # the marker the client waits for
        assert booted_marker("i-0abc", str(state)) == str(state / "booted-i-0abc")
        assert (tmp_path / "user-data.install").read_text() == "installing\n"
        assert _calls(calls) == ["-P +90 cloudlab: ipp-abc123 reached its max_hours"]
        lease = state / "lease"
        for _ in range(12):  # 3 s of heartbeats, longer than the idle timeout of 2 s
            lease.touch()
            time.sleep(0.25)
        assert len(_calls(calls)) == 1, "powered off while the client held the lease"
        stopped = time.monotonic()
        while len(_calls(calls)) < 2 and time.monotonic() - stopped < 10:
            time.sleep(0.05)
        waited = time.monotonic() - stopped
        assert _calls(calls)[1].startswith("-P now cloudlab: idle for ")
        # The idle timeout is 2 s, read in whole seconds from the file's time (-1 s), the last
        # touch was 0.25 s before ``stopped``, and the watchdog looks every 0.2 s.
        assert 0.75 <= waited <= 3.5
    finally:
        _kill_watchdog(state)


def _kill_watchdog(state):
    found = subprocess.run(["pgrep", "-f", str(state / "watchdog")], capture_output=True,
                           text=True).stdout.split()
    for pid in found:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_expiry_tags():
    now = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.timezone.utc)
    assert expires_at(2.5, now) == "2026-11-29T14:30:00Z"
    assert not expired("2026-11-29T14:30:00Z", now)
    assert expired("2026-11-29T11:59:59Z", now)
    assert expired(None, now) and expired("soon", now)  # unreadable: treated as expired
    found = tags("dask-1", 2.0, name="cloudlab-dask-1-0")
    assert found["cloudlab:cluster"] == "dask-1" and found["Name"] == "cloudlab-dask-1-0"
    assert "@" in found["cloudlab:owner"] and not expired(found["cloudlab:expires-at"])


def test_cost_so_far_counts_each_instance_from_start_to_end():
    started = {"i-1": 0.0, "i-2": 1800.0}
    figures = cost(started, {"i-1": 3600.0}, 0.10, now=7200.0)
    assert figures.instances == 1
    assert figures.dollars_per_hour == pytest.approx(0.10)
    assert figures.dollars_so_far == pytest.approx(0.10 * (1.0 + 1.5))
    assert cost(started, {}, None, now=7200.0).dollars_so_far is None

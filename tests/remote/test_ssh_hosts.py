"""Probing SSH hosts (cloudlab.backends.ssh_hosts) against real sshd on the test hosts: what
each offers, and one sentence naming the host and the fix for each way it can fail."""

import subprocess
import sys

import pytest

import cloudlab
from cloudlab.backends.ssh_hosts import HostError, SshHost, probe, probe_all
from hosts import SSH_PORT


def _host(test_host) -> SshHost:
    return SshHost(test_host.address, "root", SSH_PORT)


def _probe(test_hosts, host=None, python=sys.executable, **kwargs):
    options = {"identity_file": str(test_hosts.user_key),
               "known_hosts": str(test_hosts.known_hosts), **kwargs}
    return probe(host or _host(test_hosts.hosts[0]), python, cloudlab.__version__, **options)


@pytest.mark.parametrize("spec, parsed", [
    ("lab-pc-3", SshHost("lab-pc-3")),
    ("alice@lab-pc-3", SshHost("lab-pc-3", "alice")),
    ("10.0.0.5:2222", SshHost("10.0.0.5", None, 2222)),
    ("bob@10.0.0.5:2200", SshHost("10.0.0.5", "bob", 2200)),
])
def test_host_specs(spec, parsed):
    assert SshHost.parse(spec) == parsed and str(parsed) == spec


def test_a_bad_host_spec_shows_the_form():
    with pytest.raises(ValueError, match=r"A host is \[user@\]address\[:port\]"):
        SshHost.parse("a@b@c")


def test_every_host_reports_its_python_cloudlab_cores_and_memory(test_hosts):
    infos = probe_all([_host(h) for h in test_hosts.hosts], sys.executable,
                      cloudlab.__version__, str(test_hosts.user_key), str(test_hosts.known_hosts))
    assert [i.host.address for i in infos] == [h.address for h in test_hosts.hosts]
    for info in infos:
        assert info.cloudlab == cloudlab.__version__ and info.python == sys.executable
        assert info.python_version.startswith("3.11") and info.cores >= 1
        assert info.memory_mb > 500


def test_an_unreachable_host_is_named_with_the_fix(test_hosts):
    host = test_hosts.hosts[1]
    test_hosts.cut(host)
    try:
        with pytest.raises(HostError) as error:
            _probe(test_hosts, _host(host))
    finally:
        test_hosts.restore(host)
    assert str(error.value).startswith(f"Host root@{host.address}:{SSH_PORT} cannot be reached "
                                       f"over SSH (")
    assert str(error.value).endswith("check its address and port, and that sshd runs there.")


def test_a_refused_key_is_named_with_the_fix(test_hosts, tmp_path):
    other = tmp_path / "other_key"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    with pytest.raises(HostError, match=r"refused every key offered: add your public key to "
                                         r"~/.ssh/authorized_keys of root there \(ssh-copy-id"):
        _probe(test_hosts, identity_file=str(other))


def test_an_unknown_host_key_is_refused_not_accepted(test_hosts, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(HostError, match="its host key is not the one .* holds for it"):
        _probe(test_hosts, known_hosts=str(empty))
    assert empty.read_text() == ""  # nothing was added behind the user's back


def test_a_host_without_that_python_or_without_cloudlab_says_which(test_hosts):
    with pytest.raises(HostError, match=r"has no Python at /opt/nowhere/python3: install "
                                        r"Python 3.11 there, or name the one it has"):
        _probe(test_hosts, python="/opt/nowhere/python3")
    with pytest.raises(HostError, match=r"has Python 3\.\d+\.\d+ at /usr/bin/python3 but not "
                                        r"cloudlab: install it there \(pip install cloudlab=="):
        _probe(test_hosts, python="/usr/bin/python3")

"""Hosts that share nothing with the client, against real sshd on the test hosts: what each
offers, the environment cloudlab keeps there (this client's cloudlab and versions, from this
client or from the hosts' package index), and one sentence naming the host and the fix for
each way it can fail."""

import subprocess

import pytest

from cloudlab import wheels
from cloudlab.backends.environment import EnvironmentOptions, prepare, probe, ssh_runner
from cloudlab.backends.ssh_hosts import HostError, SshHost
from hosts import SSH_PORT
from package_index import HOST_PYTHON


def _host(test_host) -> SshHost:
    return SshHost(test_host.address, "root", SSH_PORT)


def _ssh(test_hosts, **overrides) -> dict:
    return {"identity_file": str(test_hosts.user_key),
            "known_hosts": str(test_hosts.known_hosts), **overrides}


def _probe(test_hosts, host=None, python=HOST_PYTHON, **ssh):
    host = host or _host(test_hosts.hosts[0])
    return probe(str(host), EnvironmentOptions(python=python),
                 ssh_runner(host, **_ssh(test_hosts, **ssh)))


def _prepare(test_hosts, i=0, **options):
    host = _host(test_hosts.hosts[i])
    return prepare(str(host), EnvironmentOptions(**options), ssh_runner(host, **_ssh(test_hosts)))


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


def test_a_bare_host_gets_this_clients_cloudlab_and_versions_and_keeps_them(test_hosts):
    # Debian's Python, nothing installed: not cloudlab, not the client's checkout or venv.
    bare = test_hosts.hosts[1].ssh(f"{HOST_PYTHON} -c 'import cloudlab'")
    assert bare.returncode == 1 and "No module named 'cloudlab'" in bare.stderr
    info = _prepare(test_hosts, 1)  # the first time, or found ready by an earlier test
    assert info.python.startswith("/root/.cache/cloudlab/envs/cloudlab-")
    assert info.python_version.startswith("3.11") and info.cores >= 1
    assert info.memory_mb > 500 and info.gpus == ()
    check = test_hosts.hosts[1].ssh(
        f"{info.python} -c 'import importlib.metadata as m; print(m.version(\"cloudlab\"), "
        f"m.version(\"numpy\"), m.version(\"distributed\"))'")
    import distributed
    import numpy

    assert check.stdout.split() == [wheels.own_wheel().name.split("-")[1], numpy.__version__,
                                    distributed.__version__]
    again = _prepare(test_hosts, 1)  # kept: nothing installed the second time
    assert again.python == info.python and again.installed == ""


def test_packages_come_from_the_hosts_index_and_cloudlab_never_does(test_hosts,
                                                                    package_index):
    url = package_index.url(test_hosts.client_address)
    info = _prepare(test_hosts, 0, packages="index", index_url=url,
                    env_dir="~/envs-from-the-index")
    assert info.installed.endswith("packages from index)")
    asked = package_index.asked()
    assert {"numpy", "ipyparallel", "distributed", "dask"} <= asked
    assert "cloudlab" not in asked  # its wheel came from this client
    done = test_hosts.hosts[0].ssh(f"{info.python} -c 'import cloudlab.onhost.agent, ipyparallel'")
    assert done.returncode == 0, done.stderr


def test_an_index_that_cannot_be_reached_is_named_with_the_fix(test_hosts):
    with pytest.raises(HostError, match=r"installing the engines' packages into "
                                        r"~/envs-nowhere/cloudlab-.* failed \(.*\): check "
                                        r"that it reaches its package index \(or give "
                                        r"index_url\), or set packages = \"client\""):
        _prepare(test_hosts, 0, packages="index", index_url="http://10.77.255.254:9/simple/",
                 env_dir="~/envs-nowhere")
    left = test_hosts.hosts[0].ssh("ls ~/envs-nowhere").stdout.split()
    assert [name for name in left if not name.startswith((".lock", "cloudlab-"))] == []
    assert not any(n.endswith(("-staging", "bin")) for n in left)


def test_the_users_own_environment_must_match_this_clients_versions(test_hosts):
    managed = _prepare(test_hosts, 1)
    host = test_hosts.hosts[1]
    assert _prepare(test_hosts, 1, python=managed.python, environment="own").installed == ""
    # An environment of the user's: the managed one's packages, but six at another version.
    site = "/root/own/lib/python3.11/site-packages"
    host.ssh(f"rm -rf /root/own && {HOST_PYTHON} -m venv /root/own && "
             f"{managed.python} -c 'import site; print(site.getsitepackages()[0])' "
             f"> {site}/managed.pth && mkdir {site}/six-1.0.0.dist-info && "
             f"printf 'Metadata-Version: 2.1\nName: six\nVersion: 1.0.0\n' "
             f"> {site}/six-1.0.0.dist-info/METADATA")
    import six

    with pytest.raises(HostError, match=rf"has six 1.0.0 in /root/own/bin/python and this "
                                        rf"client {six.__version__}: pip install "
                                        rf"six=={six.__version__} there, or remove environment "
                                        rf"= \"own\" from the profile"):
        _prepare(test_hosts, 1, python="/root/own/bin/python", environment="own")


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
        _prepare(test_hosts, python="/opt/nowhere/python3")
    with pytest.raises(HostError, match=r"has no cloudlab in /usr/bin/python3, and it cannot "
                                        r"come from a package index \(there, cloudlab is "
                                        r"another project\): remove environment = \"own\""):
        _prepare(test_hosts, python=HOST_PYTHON, environment="own")

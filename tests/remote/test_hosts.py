"""The test hosts themselves: namespaces that really are separate machines on a network,
sharing nothing with the client that a real machine would not."""

import os
import subprocess
import sys

import cloudlab
from hosts import CHECKOUT, SSH_PORT, reachable
from package_index import HOST_PYTHON


def test_each_host_answers_ssh_with_its_own_address_and_a_bare_python(test_hosts):
    for host in test_hosts.hosts:
        done = host.ssh(f"{HOST_PYTHON} -c 'import socket; print(socket.gethostname())'"
                        f" && ip -o -4 addr show eth0")
        assert done.returncode == 0, done.stderr
        assert f"inet {host.address}/24" in done.stdout
        for module in ("cloudlab", "numpy", "ipyparallel", "distributed", "cloudpickle"):
            missing = host.ssh(f"{HOST_PYTHON} -c 'import {module}'")
            assert f"No module named '{module}'" in missing.stderr, module


def test_a_host_sees_none_of_the_clients_checkout_venv_python_or_scripts(test_hosts):
    for host in test_hosts.hosts:
        for path in (CHECKOUT, sys.prefix, sys.base_prefix, os.path.dirname(__file__),
                     os.path.dirname(cloudlab.__file__), "/etc/xdg/pip"):
            assert host.ssh(f"ls -A {path}").stdout == "", path
        assert host.ssh(f"test -e {sys.executable}").returncode == 1


def test_a_host_sees_the_client_and_the_other_host_but_not_the_clients_loopback(test_hosts):
    one, two = test_hosts.hosts
    assert reachable(two.address, SSH_PORT)  # from the client
    check = (f"{HOST_PYTHON} -c \"import socket; s = socket.socket(); s.settimeout(2); "
             f"print(s.connect_ex(('{two.address}', {SSH_PORT})))\"")
    assert one.ssh(check).stdout.strip() == "0"
    # The client's loopback is not the host's: 127.0.0.1 inside the namespace is its own.
    ports = subprocess.run(one.inside("ss", "-ltn"), capture_output=True, text=True).stdout
    assert f"{one.address}:{SSH_PORT}" in ports and "127.0.0.1:" not in ports


def test_an_unknown_host_key_is_refused(test_hosts, tmp_path):
    host = test_hosts.hosts[0]
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    command = [("UserKnownHostsFile=" + str(empty)) if a.startswith("UserKnownHostsFile=") else a
               for a in host.ssh_command("true")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=20)
    assert done.returncode == 255 and "Host key verification failed" in done.stderr


def test_cutting_a_link_makes_the_host_unreachable_until_restored(test_hosts):
    host = test_hosts.hosts[1]
    test_hosts.cut(host)
    try:
        assert not reachable(host.address, SSH_PORT, timeout=1)
    finally:
        test_hosts.restore(host)
    assert reachable(host.address, SSH_PORT, timeout=5)

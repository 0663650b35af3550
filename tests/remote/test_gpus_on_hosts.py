"""GPUs are found where engines run, not on the client: `--gpus all` on ssh hosts starts one
engine per GPU of each host, each seeing only its own. No GPU is here: each test host's
nvidia-smi is a stand-in that lists the GPUs it is given (tests/hosts.py); the client has
none, so any GPU a cluster uses was found on a host."""

import os

import pytest

import cloudlab
from cloudlab import gpus
from conftest import wait_until_gone
from hosts import SSH_PORT, HostNetwork, missing


@pytest.fixture(scope="module")
def gpu_hosts(tmp_path_factory, host_homes):
    why = missing()
    if why:
        pytest.skip(f"test hosts cannot be built here: {why}")
    with HostNetwork(2, tmp_path_factory.mktemp("gpu-hosts"), homes=host_homes,
                     gpus={0: ["NVIDIA A10G", "NVIDIA A10G"], 1: ["NVIDIA L4"]}) as network:
        yield network


def _options(network, **more):
    return {"backend": "ssh", "hosts": [f"root@{h.address}:{SSH_PORT}" for h in network.hosts],
            "identity_file": str(network.user_key), "known_hosts": str(network.known_hosts),
            **more}


def test_gpus_all_starts_one_engine_per_gpu_of_each_host(gpu_hosts, engine):
    assert gpus.detect()[0] == []  # (the client has none)
    with cloudlab.Cluster(engine=engine, gpus="all", **_options(gpu_hosts)) as c:
        first, second = (f"root@{h.address}:{SSH_PORT}" for h in gpu_hosts.hosts)
        assert sorted((g.host, g.index, g.name) for g in c.gpus) == [
            (first, 0, "NVIDIA A10G"), (first, 1, "NVIDIA A10G"), (second, 0, "NVIDIA L4")]
        assert len(c.engine_ids) == 3
        seen = c.run(lambda: (os.readlink("/proc/self/ns/net"),
                              os.environ["CUDA_VISIBLE_DEVICES"]))
        by_host: dict[str, list[str]] = {}
        for network, device in seen.values():
            by_host.setdefault(network, []).append(device)
        assert sorted(sorted(d) for d in by_host.values()) == [["0"], ["0", "1"]]
        rows = c.status()
        assert sorted(r.gpu for r in rows) == ["0: NVIDIA A10G", "0: NVIDIA L4", "1: NVIDIA A10G"]
    assert wait_until_gone(c.name, 10) == []


def test_gpus_on_hosts_without_any_is_one_sentence_and_starts_nothing(test_hosts):
    with pytest.raises(cloudlab.ConfigError, match=r"--gpus all asks for GPUs, but no host "
                                                   r"offers one \(nvidia-smi lists none on "):
        cloudlab.Cluster(2, gpus="all", **_options(test_hosts)).start()
    assert test_hosts.cloudlab_processes() == {h.name: [] for h in test_hosts.hosts}

"""Play the cloud's part for EC2 instances that moto_server says exist: each becomes a
network-namespace host (tests/hosts.py) that boots as an EC2 VM would.

For every instance cloudlab starts through the real EC2 API of moto_server, a watcher
thread makes a host at the instance's private address (the test's VPC subnet is the host
network's own /24), with sshd on port 22 accepting the instance's key pair, the instance
metadata service at 169.254.169.254 (tests/imds.py), and a private /var/lib/cloudlab and
runtime folder (a VM's disk is its own). Then it runs the instance's user-data, decoded
from what EC2 stored, in that host, as cloud-init would: for real, with a stand-in
`shutdown` that, like EC2 for an instance started with shutdown behaviour "terminate",
terminates the instance. Terminated instances' hosts are removed.
"""

from __future__ import annotations

import base64
import subprocess
import sys
import threading
import time
from pathlib import Path

from cloudlab.backends import _vm
from cloudlab.security import runtime_dir
from hosts import HostNetwork

HERE = Path(__file__).parent
IMDS_TOKEN = "http://169.254.169.254/latest/api/token"


class FakeVms:
    def __init__(self, network: HostNetwork, ec2, folder: Path):
        self.network, self.ec2, self.folder = network, ec2, folder
        self.hosts: dict[str, object] = {}  # instance id -> TestHost
        self.seen: set[str] = set()
        self.booted: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> FakeVms:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)
        for host in list(self.hosts.values()):
            self.network.remove_host(host)
        self.hosts.clear()

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            try:
                self._look()
            except Exception as e:  # (reported by the test, not lost in a thread)
                self.errors.append(repr(e))

    def _look(self) -> None:
        reply = self.ec2.describe_instances(Filters=[
            {"Name": "tag-key", "Values": [_vm.TAG_CLUSTER]}])
        for reservation in reply["Reservations"]:
            for i in reservation["Instances"]:
                vm, state = i["InstanceId"], i["State"]["Name"]
                if state in ("pending", "running") and vm not in self.seen:
                    self.seen.add(vm)  # (booted once, even if that fails)
                    self._boot(i)
                elif state in ("shutting-down", "terminated") and vm in self.hosts:
                    self.network.remove_host(self.hosts.pop(vm))
                if vm in self.hosts and self._shut_down(vm):
                    self.ec2.terminate_instances(InstanceIds=[vm])

    def _boot(self, instance: dict) -> None:
        from botocore.exceptions import ClientError

        vm = instance["InstanceId"]
        try:
            key = self.ec2.describe_key_pairs(KeyNames=[instance["KeyName"]],
                                              IncludePublicKey=True)["KeyPairs"][0]["PublicKey"]
        except ClientError:
            return  # its cluster was deleted (by gc) before it booted: it is being terminated
        host = self.network.add_host(instance["PrivateIpAddress"], port=22, authorized_key=key,
                                     private=(Path(_vm.STATE_DIR), runtime_dir()))
        self.hosts[vm] = host
        subprocess.run(["ip", "-n", host.name, "addr", "add", "169.254.169.254/32", "dev",
                        "lo"], check=True)
        subprocess.Popen(host.inside(sys.executable, str(HERE / "imds.py"), vm),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10  # (on a VM, the metadata service is there at boot)
        while subprocess.run(host.inside("curl", "-sf", "-X", "PUT", IMDS_TOKEN),
                             capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the metadata service of {vm} did not start")
            time.sleep(0.05)
        data = self.ec2.describe_instance_attribute(InstanceId=vm, Attribute="userData")
        script = host.folder / "user-data"
        script.write_bytes(base64.b64decode(data["UserData"]["Value"]))
        script.chmod(0o700)
        fake = host.folder / "bin"
        fake.mkdir()
        (fake / "shutdown").write_text(f"#!/bin/sh\necho \"$*\" >> {host.folder}/shutdown\n")
        (fake / "shutdown").chmod(0o755)
        # In the host's network and in its sshd's mount namespace (its private folders).
        subprocess.Popen(["nsenter", f"--net=/run/netns/{host.name}",
                          f"--mount=/proc/{host.sshd_pid}/ns/mnt", "env",
                          f"PATH={fake}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                          str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        self.booted.append(vm)

    def _shut_down(self, vm: str) -> bool:
        """Whether the VM asked to power off now (its idle or hard expiry)."""
        calls = self.hosts[vm].folder / "shutdown"
        return calls.exists() and any(" now " in f" {line} " or line.startswith("-P now")
                                      for line in calls.read_text().splitlines())

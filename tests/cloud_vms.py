"""Play the cloud's part for the VMs a cloud API says exist: each becomes a network-namespace
host (tests/hosts.py) that boots as the cloud's VM would.

For every VM cloudlab creates through the cloud's API (EC2: moto_server; Azure: the replayed
Resource Manager of tests/fake_arm.py), a host is made at the VM's private address (the
test's subnet is the host network's own /24; a public address, where the VM has one, is
the host's too, for SSH only), with sshd on port 22 accepting the VM's key, the instance metadata service
at 169.254.169.254 (tests/imds.py), and a private /var/lib/cloudlab and runtime folder (a
VM's disk is its own). Then it runs the VM's user-data (custom data), as cloud-init would:
for real, with a stand-in `shutdown` that records its calls. What a power-off from inside
does is the cloud's: EC2 terminates an instance started with shutdown behaviour
"terminate"; Azure keeps the VM, stopped (and billed). Deleted VMs' hosts are removed.
"""

from __future__ import annotations

import base64
import json
import queue
import signal
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


def client_process(options: dict, engines: int, prelude: str = "") -> subprocess.Popen:
    """A client in a process of its own (for the test to kill): it runs ``prelude``, starts
    a cluster with ``options``, prints "starting NAME" and "started", then waits."""
    script = (f"{prelude}\n"
              "import json, sys, time, cloudlab\n"
              f"c = cloudlab.Cluster({engines}, **json.loads({json.dumps(json.dumps(options))}))\n"
              "print('starting', c.name, flush=True)\n"
              "c.start()\n"
              "print('started', flush=True)\n"
              "time.sleep(600)\n")
    return subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)


def killed_after_start(options: dict, engines: int, while_up, prelude: str = "") -> str:
    """The name of a cluster whose client (:func:`client_process`) was killed with SIGKILL
    once it had started, and ``while_up(name)`` had looked at it."""
    client = client_process(options, engines, prelude)
    try:
        name = client.stdout.readline().split()[1]
        assert client.stdout.readline().strip() == "started"
        while_up(name)
        client.send_signal(signal.SIGKILL)
        client.wait(10)
    finally:
        client.kill()
    return name


class TestVms:
    """Hosts playing VMs: :meth:`boot` one, :meth:`remove` it; a thread looks after them."""

    __test__ = False  # (not a pytest test class)

    def __init__(self, network: HostNetwork, folder: Path):
        self.network, self.folder = network, folder
        self.hosts: dict[str, object] = {}  # VM id -> TestHost
        self.booted: list[str] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self):
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
        raise NotImplementedError

    def boot(self, vm: str, private_ip: str, key: str, user_data: bytes,
             metadata: list[str], public_ip: str | None = None,
             bin_files: dict[str, str] | None = None) -> None:
        """A host for VM ``vm`` that runs ``user_data`` with ``metadata`` (tests/imds.py's
        arguments) served, and ``bin_files`` (name -> script) first on its PATH."""
        host = self.network.add_host(private_ip, port=22, authorized_key=key,
                                     private=(Path(_vm.STATE_DIR), runtime_dir()),
                                     public_address=public_ip)
        self.hosts[vm] = host
        subprocess.run(["ip", "-n", host.name, "addr", "add", "169.254.169.254/32", "dev", "lo"],
                       check=True)
        subprocess.Popen(host.inside(sys.executable, str(HERE / "imds.py"), *metadata),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10  # (on a VM, the metadata service is there at boot)
        probe = ["curl", "-s", "-o", "/dev/null", "http://169.254.169.254/"]
        while subprocess.run(host.inside(*probe), capture_output=True).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the metadata service of {vm} did not start")
            time.sleep(0.05)
        script = host.folder / "user-data"
        script.write_bytes(user_data)
        script.chmod(0o700)
        fake = host.folder / "bin"
        fake.mkdir()
        files = {"shutdown": f"#!/bin/sh\necho \"$*\" >> {host.folder}/shutdown\n",
                 **(bin_files or {})}
        for name, text in files.items():
            (fake / name).write_text(text)
            (fake / name).chmod(0o755)
        # In the host's network and in its sshd's mount namespace (its private folders).
        subprocess.Popen(["nsenter", f"--net=/run/netns/{host.name}",
                          f"--mount=/proc/{host.sshd_pid}/ns/mnt", "env",
                          f"PATH={fake}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                          str(script)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
        self.booted.append(vm)

    def remove(self, vm: str) -> None:
        host = self.hosts.pop(vm, None)
        if host is not None:
            self.network.remove_host(host)

    def shut_down(self, vm: str) -> bool:
        """Whether the VM asked to power off now (its idle or hard expiry)."""
        calls = self.hosts[vm].folder / "shutdown"
        return calls.exists() and any(" now " in f" {line} " or line.startswith("-P now")
                                      for line in calls.read_text().splitlines())


class FakeVms(TestVms):
    """EC2's instances, as moto_server lists them."""

    def __init__(self, network: HostNetwork, ec2, folder: Path):
        super().__init__(network, folder)
        self.ec2 = ec2
        self.seen: set[str] = set()

    def _look(self) -> None:
        reply = self.ec2.describe_instances(Filters=[
            {"Name": "tag-key", "Values": [_vm.TAG_CLUSTER]}])
        for reservation in reply["Reservations"]:
            # EC2 gives every instance of a launch its instance profile; moto records it for
            # the first one only.
            profile = next(filter(None, (i.get("IamInstanceProfile")
                                         for i in reservation["Instances"])), None)
            for i in reservation["Instances"]:
                vm, state = i["InstanceId"], i["State"]["Name"]
                if state in ("pending", "running") and vm not in self.seen:
                    self.seen.add(vm)  # (booted once, even if that fails)
                    self._boot(i, profile)
                elif state in ("shutting-down", "terminated") and vm in self.hosts:
                    self.remove(vm)
                if vm in self.hosts and self.shut_down(vm):
                    self.ec2.terminate_instances(InstanceIds=[vm])

    def _boot(self, instance: dict, profile: dict | None) -> None:
        from botocore.exceptions import ClientError

        vm = instance["InstanceId"]
        try:
            key = self.ec2.describe_key_pairs(KeyNames=[instance["KeyName"]],
                                              IncludePublicKey=True)["KeyPairs"][0]["PublicKey"]
            role = self._role(vm, profile)
        except ClientError:
            # Its cluster was deleted (by gc, or an interrupted start) before it booted: its
            # key or its instance profile is gone, and it is being terminated.
            return
        data = self.ec2.describe_instance_attribute(InstanceId=vm, Attribute="userData")
        self.boot(vm, instance["PrivateIpAddress"], key,
                  base64.b64decode(data["UserData"]["Value"]), ["ec2", vm, *role])

    def _role(self, vm: str, profile: dict | None) -> list[str]:
        """The instance profile's role and credentials for it, as EC2 gets them (STS)."""
        if not profile:
            return []
        import boto3

        endpoint, region = self.ec2.meta.endpoint_url, self.ec2.meta.region_name
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=region)
        role = iam.get_instance_profile(InstanceProfileName=profile["Arn"].split("/")[-1])[
            "InstanceProfile"]["Roles"][0]
        sts = boto3.client("sts", endpoint_url=endpoint, region_name=region)
        credentials = sts.assume_role(RoleArn=role["Arn"], RoleSessionName=vm)["Credentials"]
        credentials["Expiration"] = credentials["Expiration"].strftime("%Y-%m-%dT%H:%M:%SZ")
        return [role["RoleName"], json.dumps(credentials)]


class AzureVms(TestVms):
    """Azure's VMs, as the replayed Resource Manager (tests/fake_arm.py) creates them; their
    own calls to Resource Manager (an expiring VM deletes itself) go to ``arm_url``."""

    def __init__(self, network: HostNetwork, folder: Path, arm_url: str):
        super().__init__(network, folder)
        self.arm_url = arm_url
        self.arm = None
        self._events: queue.Queue = queue.Queue()

    def created(self, arm, resource: dict) -> None:  # FakeArm's on_vm
        self.arm = arm
        self._events.put(("boot", resource, arm.custom_data[resource["id"].lower()],
                          arm.identity_token(resource) if "identity" in resource else "-"))

    def deleted(self, arm, resource: dict) -> None:  # FakeArm's on_vm_gone
        self._events.put(("remove", resource))

    def _look(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event[0] == "remove":
                self.remove(event[1]["id"].lower())
                continue
            _, vm, custom_data, token = event
            key = vm["properties"]["osProfile"]["linuxConfiguration"]["ssh"]["publicKeys"][0]
            private, public = self._addresses(vm)
            # curl on the VM reaches Resource Manager over HTTP here (no TLS in the tests).
            curl = ('#!/bin/bash\nargs=()\nfor a in "$@"; do '
                    f'args+=("${{a//https:\\/\\/management.azure.com/{self.arm_url}}}"); '
                    'done\nexec /usr/bin/curl "${args[@]}"\n')
            self.boot(vm["id"].lower(), private, key["keyData"], base64.b64decode(custom_data),
                      ["azure", vm["name"], vm["id"], token], public, {"curl": curl})
        for vm in list(self.hosts):
            if self.arm is not None and self.shut_down(vm) and vm in self.arm.vm_power:
                self.arm.vm_power[vm] = "stopped"  # (powered off from inside: still billed)

    def _addresses(self, vm: dict) -> tuple[str, str | None]:
        nic = self.arm.resources[vm["properties"]["networkProfile"]["networkInterfaces"][0]
                                 ["id"].lower()]
        configuration = nic["properties"]["ipConfigurations"][0]["properties"]
        public = configuration.get("publicIPAddress")
        address = self.arm.resources[public["id"].lower()]["properties"]["ipAddress"] \
            if public else None
        return configuration["privateIPAddress"], address

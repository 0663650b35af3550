"""What every cloud backend shares: the VM's bootstrap script, its expiry, its tags, its cost.

A cloud VM must never outlive its use, whatever happens to the client. Three independent
guards see to it:

1. **Its own timers** (in the bootstrap script, no client needed): the VM powers itself off
   ``max_hours`` after boot, and as soon as no engine on it has heard from the client for
   ``idle_timeout`` seconds (engines touch a lease file at each of the client's heartbeats).
   VMs are started so that expiring deletes them (EC2: instance-initiated shutdown
   behaviour = terminate; Azure, where a VM powered off from inside is still billed: the
   VM deletes itself through its managed identity, which may delete that VM only).
2. **Its tags**: cluster, owner and an ``expires-at`` time, so that ``cloudlab gc`` can find
   and delete anything expired or orphaned, from any machine with the credentials.
3. **The client**: a failed or partial start deletes everything it created, and stop
   terminates (never merely stops) every VM.

The bootstrap script is rendered by :func:`render_bootstrap`, a pure function: no secret
goes into it (keys and connection files reach the VM later, over SSH, from the client), and
it stays far below EC2's 16 KB user-data limit.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import getpass
import ipaddress
import shlex
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from ..errors import ConfigError, StartError
from ..onhost.agent import LEASE_FILE as LEASE_FILE_ENV
from ..profiles import option
from .base import AwsScope, Backend, Command, Launched, ServicePlace, check_mpi4py
from .environment import EnvironmentOptions
from .ssh_hosts import SshHost, ssh_command

#: EC2 refuses user-data over 16 KB (before base64); Azure's custom data allows 64 KB.
USER_DATA_LIMIT = 16 * 1024
#: Where the bootstrap keeps its state on the VM: its log, the lease file engines touch at
#: each heartbeat from the client (``lease``: the agent's CLOUDLAB_LEASE_FILE), the marker of
#: a finished boot.
STATE_DIR = "/var/lib/cloudlab"
#: Tag keys on every resource cloudlab creates.
TAG_CLUSTER, TAG_OWNER, TAG_EXPIRES = "cloudlab:cluster", "cloudlab:owner", "cloudlab:expires-at"


#: Makes sure a fresh Ubuntu VM's Python can make a venv (Ubuntu leaves ensurepip out).
#: cloudlab itself and the engines' packages are installed later, over SSH, by the client
#: (:mod:`.environment`): its own cloudlab, never a name looked up on an index.
DEFAULT_INSTALL = ("python3 -c 'import ensurepip' 2>/dev/null || "
                   "{ apt-get update -q && apt-get install -y -q python3-venv; }")
#: Open MPI for an MPI cluster's VMs (--mpi): its mpirun runs on the first VM.
MPI_INSTALL = ("command -v mpirun >/dev/null || "
               "{ apt-get update -q && apt-get install -y -q openmpi-bin; }")


@dataclass(frozen=True)
class VmOptions(EnvironmentOptions):
    """What every cloud's profile table has (its own adds region, size, image...)."""

    engines_per_instance: int = option(0, "Engines on each VM (0: one per vCPU).")
    spot: bool = option(False, "Spot VMs: cheaper, and the cloud may take them back (the "
                        "engine is then replaced).")
    max_price: float = option(0.0, "Spot only: the most $/h to pay per VM (0: up to the "
                              "on-demand price).")
    idle_timeout: float = option(900.0, "Seconds a VM lives on once no engine on it hears "
                                 "from this client; then it deletes itself.")
    max_hours: float = option(8.0, "Hours after which a VM deletes itself, whatever happens.")
    client_cidr: str = option("", "Addresses allowed to SSH in (default: this machine's "
                              "public address, /32).")
    install: str = option(DEFAULT_INSTALL, "Shell commands run as root when a new VM boots, "
                          "before engines start (default: make sure python3 can make a venv).")
    packages: str = option("index", "Where the VMs' packages come from: \"index\" (the "
                           "VMs' package index: fast in a cloud), \"client\" (sent from here "
                           "over SSH), \"auto\".", choices=("auto", "index", "client"))
    price_per_hour: float = option(0.0, "$/h of one VM, for the cost shown (0: the cloud's "
                                   "price where it can be read).")
    use_private_ip: bool = option(False, "Reach the VMs at their private addresses (a client "
                                  "inside the same network, or over a VPN).")
    lease: float = option(30.0, "Seconds an engine lives on without hearing from this client "
                          "(a cut link) before it ends itself.")
    mpi_args: tuple[str, ...] = option((), "More mpirun options for --mpi (it runs on the "
                                       "first VM), e.g. [\"--mca\", \"btl_tcp_if_include\", "
                                       "\"10.0.0.0/16\"].")


@dataclass(frozen=True)
class Bootstrap:
    """What a VM's bootstrap needs to know."""

    cluster: str
    #: Shell commands run first as root (the profile's ``install``).
    install: str
    idle_timeout: float  # seconds without a heartbeat before the VM powers off
    max_hours: float  # hours after boot at which the VM powers off regardless
    #: Shell command printing this VM's id (from the cloud's instance metadata).
    instance_id_command: str
    #: Seconds between the watchdog's looks at the lease file.
    check_every: float = 15.0
    #: Seconds after boot before idleness counts (the cluster's start: other VMs boot,
    #: the controller starts, engines connect).
    boot_grace: float = 300.0
    state_dir: str = STATE_DIR
    #: Shell commands run when the VM expires, before it powers off (Azure: delete the VM).
    on_expiry: str = ""

    @property
    def lease_file(self) -> str:
        return f"{self.state_dir}/lease"


def render_bootstrap(b: Bootstrap) -> str:
    """The VM's first-boot script (cloud-init runs a user-data script that starts with #!)."""
    max_minutes = max(1, int(b.max_hours * 60))
    idle = max(1, int(b.idle_timeout))
    STATE_DIR, LEASE_FILE = shlex.quote(b.state_dir), shlex.quote(b.lease_file)  # noqa: N806
    script = f"""#!/bin/bash
# cloudlab bootstrap, cluster {b.cluster}: make Python ready, then keep this VM
# only while its client holds the lease. No secret is in this script: keys and connection
# files arrive later over SSH, from the client.
set -u
mkdir -p {STATE_DIR}
exec >>{STATE_DIR}/bootstrap.log 2>&1
echo "cloudlab bootstrap of {b.cluster} starts at $(date -u +%FT%TZ)"

# 1. Hard expiry, whatever happens next: power off after max_hours (the VM was started so
#    that expiring deletes it).
shutdown -P +{max_minutes} "cloudlab: {b.cluster} reached its max_hours" || true

# 2. Idle expiry: power off once no engine has heard from the client for {idle} s. Engines
#    touch the lease file at each heartbeat; the boot counts as one {int(b.boot_grace)} s
#    from now (the cluster's start).
touch -d "+{int(b.boot_grace)} seconds" {LEASE_FILE}
chmod 666 {LEASE_FILE}  # (engines run as the login user, not root)
cat >{STATE_DIR}/expire <<'CLOUDLAB_EXPIRE'
#!/bin/bash
{b.on_expiry.strip() or ':'}
shutdown -P now "cloudlab: $1"
CLOUDLAB_EXPIRE
cat >{STATE_DIR}/watchdog <<'CLOUDLAB_WATCHDOG'
#!/bin/bash
booted=$(date +%s)
while sleep {b.check_every:g}; do
  now=$(date +%s)
  age=$(( now - $(stat -c %Y {LEASE_FILE}) ))
  if [ "$age" -gt {idle} ]; then
    echo "cloudlab: no heartbeat from the client for $age s: expiring"
    exec {STATE_DIR}/expire "idle for $age s"
  fi
  if [ $(( now - booted )) -ge {max(30, max_minutes * 60 - 60)} ]; then
    echo "cloudlab: max_hours reached: expiring"
    exec {STATE_DIR}/expire "reached its max_hours"
  fi
done
CLOUDLAB_WATCHDOG
chmod 700 {STATE_DIR}/expire
chmod 700 {STATE_DIR}/watchdog
nohup {STATE_DIR}/watchdog >>{STATE_DIR}/watchdog.log 2>&1 </dev/null &

# 3. What the profile installs (cloudlab itself comes later, over SSH, from the client).
{b.install.strip() or ':'}

# 4. Ready: the client waits for this marker, named by the VM's id (the metadata service
#    may answer only a moment after boot).
for attempt in $(seq 60); do
  instance=$({b.instance_id_command}) && [ -n "$instance" ] && break
  sleep 1
done
touch {STATE_DIR}/booted-"$instance"
echo "cloudlab bootstrap of {b.cluster} done at $(date -u +%FT%TZ) on $instance"
"""
    if len(script.encode()) > USER_DATA_LIMIT:
        raise ValueError(f"The bootstrap script is {len(script.encode()):,} bytes, over the "
                         f"16 KB user-data limit: shorten the profile's install commands.")
    return script


def booted_marker(instance_id: str, state_dir: str = STATE_DIR) -> str:
    """The file whose presence on a VM says its bootstrap is done."""
    return f"{state_dir}/booted-{instance_id}"


def owner() -> str:
    """Who and where: ``alice@laptop``, on every resource's owner tag."""
    return f"{getpass.getuser()}@{socket.gethostname()}"


def expires_at(max_hours: float, now: dt.datetime | None = None) -> str:
    """The expires-at tag: when the VM will have powered itself off at the latest (UTC)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    return (now + dt.timedelta(hours=max_hours)).strftime("%Y-%m-%dT%H:%M:%SZ")


def expired(tag: str | None, now: dt.datetime | None = None) -> bool:
    """Whether an expires-at tag has passed (a missing or garbled tag counts as expired)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    try:
        when = dt.datetime.strptime(tag or "", "%Y-%m-%dT%H:%M:%SZ")
    except ValueError:
        return True
    return when.replace(tzinfo=dt.timezone.utc) <= now


def tags(cluster: str, max_hours: float, name: str | None = None) -> dict[str, str]:
    found = {TAG_CLUSTER: cluster, TAG_OWNER: owner(), TAG_EXPIRES: expires_at(max_hours)}
    if name:
        found["Name"] = name
    return found


@dataclass(frozen=True)
class Cost:
    """Instances, their price and what they have cost so far."""

    instances: int
    dollars_per_hour: float | None
    dollars_so_far: float | None


def cost(started: dict[str, float], ended: dict[str, float], price_per_hour: float | None,
         now: float) -> Cost:
    """From each instance's start (and, for those gone, end) time in epoch seconds. Clouds
    bill by the second (EC2 Linux, Azure): the running total is the price times the hours."""
    running = [i for i in started if i not in ended]
    if price_per_hour is None:
        return Cost(len(running), None, None)
    hours = sum((ended.get(i, now) - t0) / 3600 for i, t0 in started.items())
    return Cost(len(running), price_per_hour * len(running), price_per_hour * hours)


def why_garbage(resource_tags: dict[str, str], live_clusters: set[str],
                now: dt.datetime | None = None) -> str | None:
    """Why ``cloudlab gc`` deletes a resource with these tags (None: it stays).

    Expired resources go, whoever made them; so do this machine's own resources whose
    cluster no longer runs here (a killed kernel, a crash). Another machine's resources stay
    until they expire: their cluster may well be running there.
    """
    cluster = resource_tags.get(TAG_CLUSTER)
    if cluster is None:
        return None  # not cloudlab's
    if expired(resource_tags.get(TAG_EXPIRES), now):
        return f"expired at {resource_tags.get(TAG_EXPIRES) or '(no expiry tag)'}"
    if resource_tags.get(TAG_OWNER) == owner() and cluster not in live_clusters:
        return f"its cluster {cluster} no longer runs on this machine"
    return None


# ---------------------------------------------------------------------- the backend
class VmBackend(Backend):
    """Engines on cloud VMs that this cluster creates, and deletes when it stops.

    A cloud module supplies the SDK calls (``create``, ``add_instances``, ``describe``,
    ``terminate``, ``delete``) and its options; this class does the rest, the same for every
    cloud: it makes a key for this cluster only, renders the bootstrap, creates the VMs
    (``provision``, before anything else starts), waits until each has booted, and then
    runs the controller on the first VM and the engines on all of them over SSH
    (:class:`.ssh.SshBackend` with ``controller_host``). Engines touch the VM's lease file
    at each heartbeat, so a VM whose client is gone deletes itself. Stop terminates
    every VM and deletes the key and the network rules.
    """

    knows_engine_pids = False
    #: Shell command printing the VM's id, from the cloud's instance metadata.
    instance_id_command: ClassVar[str]

    def __init__(self, options: Any, cluster_name: str):
        super().__init__(options, cluster_name)
        self.check_options()
        self.cloud: Any = None  # the SDK object, made at provision (it may need credentials)
        self.created: Any = None
        self._ssh: Any = None  # the SshBackend over the VMs
        self._vms: dict[str, Any] = {}  # instance id -> Vm, as last described
        self._started: dict[str, float] = {}
        self._ended: dict[str, float] = {}
        self._slots = 1
        self._creating: asyncio.Future | None = None
        self._price: float | None = None  # $/h of one VM, read at provision
        self._mpi = False

    # Subclasses: the cloud's SDK object, its vCPUs per VM, its price per hour.
    def make_cloud(self) -> Any:
        raise NotImplementedError

    def vcpus(self) -> int:
        raise NotImplementedError

    def price_per_hour(self) -> float | None:
        return self.options.price_per_hour or None

    def check_mpi(self) -> None:
        check_mpi4py("the VMs")
        self._mpi = True

    async def launch_world(self, commands: list[Command]) -> list[Launched]:
        """The ranks of one MPI job across the VMs, its mpirun on the first VM."""
        return await self._ssh.launch_world([self._with_lease_file(c) for c in commands])

    @staticmethod
    def _with_lease_file(command: Command) -> Command:
        # Each heartbeat an engine hears also keeps its VM from expiring.
        return dataclasses.replace(command, env={**command.env,
                                                 LEASE_FILE_ENV: f"{STATE_DIR}/lease"})

    def check_options(self) -> None:
        o = self.options
        if o.max_hours <= 0 or o.idle_timeout <= 0:
            raise ConfigError("max_hours and idle_timeout must be above 0: they are what "
                              "deletes a forgotten VM.")
        if o.engines_per_instance < 0:
            raise ConfigError(f"engines_per_instance must be 0 (one per vCPU) or more, not "
                              f"{o.engines_per_instance}.")

    @property
    def controller_ip(self) -> str:
        if not self._vms:
            raise StartError("The VMs are not there yet (provision comes first).")
        return self._address(next(iter(self._vms.values())))

    def max_engines(self, mb_per_engine: int) -> tuple[int, str]:
        return 1024, "1024 engines per cluster"

    def service_place(self) -> ServicePlace:
        # The VMs' network rules let in nothing from outside but SSH: not this client.
        return ServicePlace(None, self.aws_scope(), tunnel=self._ssh.reverse_tunnel)

    def aws_scope(self) -> AwsScope | None:
        """The AWS services the VMs may use by a role of their own (None: none)."""
        return None

    def _address(self, vm) -> str:
        return vm.public_ip if vm.public_ip and not self.options.use_private_ip else vm.private_ip

    # ------------------------------------------------------------------ start
    async def provision(self, engines: int, timeout: float) -> None:
        """Create the VMs ``engines`` engines need, and wait until they have booted."""
        self._boot_deadline = time.monotonic() + timeout
        assert self.workdir is not None  # the cluster sets it when it starts
        self.cloud = await asyncio.to_thread(self.make_cloud)
        self._slots = self.options.engines_per_instance or await asyncio.to_thread(self.vcpus)
        key = self.workdir / "vm_key"
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C",
                        f"cloudlab-{self.cluster_name}", "-f", str(key)], check=True)
        self._known_hosts = self.workdir / "known_hosts"
        self._known_hosts.touch(mode=0o600)
        count = -(-engines // self._slots)
        cidr = self.options.client_cidr or await asyncio.to_thread(public_cidr)
        install = "\n".join(filter(None, [self.options.install,
                                          MPI_INSTALL if self._mpi else None]))
        self._user_data = render_bootstrap(Bootstrap(
            self.cluster_name, install, self.options.idle_timeout,
            self.options.max_hours, self.instance_id_command,
            check_every=min(15.0, max(0.5, self.options.idle_timeout / 4)),
            boot_grace=timeout, on_expiry=self.on_expiry()))
        # Shielded: a start interrupted now still learns what was created, to delete it.
        self._creating = asyncio.ensure_future(asyncio.to_thread(
            self.cloud.create, self.cluster_name, count, key.with_suffix(".pub").read_text(),
            self._user_data, cidr))
        self.created = await asyncio.shield(self._creating)
        # Once: the cost is shown at every refresh of the cluster view.
        self._price = await asyncio.to_thread(self.price_per_hour)
        await self._booted(self.created.instances)
        from .ssh import SshBackend, SshOptions

        hosts = [self._ssh_target(vm) for vm in self._vms.values()]
        # The controller listens on the first VM's private address (a public one is the
        # cloud's translation, not on the VM), where the other VMs reach it; the client
        # reaches it through the SSH tunnel.
        environment = {f.name: getattr(self.options, f.name)
                       for f in dataclasses.fields(EnvironmentOptions)}
        self._ssh = SshBackend(SshOptions(
            hosts=tuple(hosts), **environment, identity_file=str(key),
            known_hosts=str(self._known_hosts), lease=self.options.lease,
            controller_host=hosts[0], tunnel=not self.options.use_private_ip,
            controller_address=next(iter(self._vms.values())).private_ip or "",
            mpi_args=self.options.mpi_args), self.cluster_name)
        self._ssh.workdir = self.workdir
        if self._mpi:  # the VMs may not reach this client: mpirun runs on the first VM
            self._ssh.mpi_launcher = self._ssh.hosts[0]
            self._ssh.check_mpi()

    def _ssh_target(self, vm) -> str:
        return f"{self.options.ssh_user}@{self._address(vm)}"

    async def _booted(self, ids: list[str], timeout: float | None = None) -> None:
        """Until each VM runs, has an address and has finished its bootstrap."""
        waiting = set(ids)
        deadline = self._boot_deadline if timeout is None else time.monotonic() + timeout
        while waiting:
            if time.monotonic() > deadline:
                raise StartError(
                    f"{len(waiting)} of {len(ids)} VMs had not finished booting in time "
                    f"({', '.join(sorted(waiting))}); they are deleted. Their bootstrap log "
                    f"is {STATE_DIR}/bootstrap.log on each: raise start_timeout if the "
                    f"install is slow.")
            for vm in await asyncio.to_thread(self.describe, sorted(waiting)):
                if vm.state in ("shutting-down", "terminated", "stopped"):
                    raise StartError(f"VM {vm.id} {vm.state} while it booted ({vm.reason}).")
                if vm.state == "running" and self._address(vm):
                    if await asyncio.to_thread(self._has_booted, vm):
                        self._vms[vm.id] = vm
                        self._started[vm.id] = vm.launched
                        waiting.discard(vm.id)
            if waiting:
                await asyncio.sleep(BOOT_POLL)

    def _has_booted(self, vm) -> bool:
        """Whether the VM's bootstrap has left its marker (its host key is learnt now: the
        VM was created a moment ago by this cluster, for this cluster only)."""
        assert self.workdir is not None  # (see provision)
        argv = ssh_command(SshHost.parse(self._ssh_target(vm)), f"test -e {booted_marker(vm.id)}",
                           str(self.workdir / "vm_key"), str(self._known_hosts), "accept-new")
        try:
            return subprocess.run(argv, capture_output=True, timeout=20,
                                  stdin=subprocess.DEVNULL).returncode == 0
        except subprocess.TimeoutExpired:
            return False

    async def prepare(self, preload: tuple[str, ...]) -> None:
        await self._ssh.prepare(preload)

    async def gpus(self) -> tuple[list, str]:
        return await self._ssh.gpus()

    async def launch(self, command: Command, cleanup: tuple[Path, ...] = ()) -> Launched:
        if not command.controller:
            await self._make_room()
            command = self._with_lease_file(command)
        process = await self._ssh.launch(command, cleanup)
        vm = next((v for v in self._vms.values() if self._address(v) == process.host), None)
        if vm is not None:
            process.machine_gone = lambda: self.why_gone(vm.id)
        return process

    def why_gone(self, instance: str) -> str | None:
        """Why an engine's VM is no longer there, from the cloud (None: it still runs); a
        VM that is gone takes no more engines."""
        found = self.describe([instance])
        if not found or found[0].state not in GONE:
            return None
        self._forget(instance)
        return self.lost(found[0])

    # Subclasses: how the cloud describes VMs, and names the loss of one.
    def describe(self, ids: list[str]) -> list:
        return self.cloud.describe(ids)

    def lost(self, vm) -> str:
        return f"lost its VM {vm.id}, which was {vm.state} ({vm.reason or 'no reason given'})"

    def on_expiry(self) -> str:
        """Shell commands an expiring VM runs before it powers off (see :class:`Bootstrap`)."""
        return ""

    def _forget(self, instance: str) -> None:
        vm = self._vms.pop(instance, None)
        if vm is not None:
            self._ended.setdefault(instance, time.time())
            target = SshHost.parse(self._ssh_target(vm))
            self._ssh.hosts[:] = [h for h in self._ssh.hosts if h != target]

    async def _make_room(self) -> None:
        """One more VM when every VM holds its share of engines (a scale up, a replacement)."""
        if sum(self._ssh.load().values()) < self._slots * len(self._vms) and self._ssh.hosts:
            return
        ids = await asyncio.to_thread(self.cloud.add_instances, self.cluster_name, 1,
                                      self._user_data, self.created)
        await self._booted(ids, timeout=BOOT_TIMEOUT)
        self._ssh.hosts.append(SshHost.parse(self._ssh_target(self._vms[ids[0]])))

    async def reach(self, addresses: list[tuple[str, int]]) -> list[tuple[str, int]]:
        return await self._ssh.reach(addresses)

    async def terminate(self, launched: list[Launched], grace: float = 1.0) -> None:
        if self._ssh is not None:
            await self._ssh.terminate(launched, grace)

    async def close(self) -> None:
        if self._ssh is not None:
            await self._ssh.close()
        if self._creating is not None:
            await asyncio.wait([self._creating])  # (an interrupted start: it still finishes)
            if self._creating.exception() is None:
                self.created = self._creating.result()
        if self.created is not None:
            await asyncio.to_thread(self.cloud.delete, self.created)
            now = time.time()
            self._ended.update({i: now for i in self._started if i not in self._ended})

    def cost(self) -> Cost | None:
        return cost(self._started, self._ended, self._price, time.time())


#: States of a VM whose engines are gone, or going (a stopped VM runs none either).
GONE = ("shutting-down", "terminated", "stopping", "stopped")
#: Seconds between looks at VMs that are booting.
BOOT_POLL = 2.0
#: Seconds a VM added to a running cluster (a scale up, a replacement) has to boot.
BOOT_TIMEOUT = 600.0


def public_cidr() -> str:
    """This machine's public address as a /32, as a web service sees it."""
    import urllib.request

    try:
        with urllib.request.urlopen("https://checkip.amazonaws.com", timeout=5) as reply:
            address = reply.read().decode().strip()
        ipaddress.ip_address(address)
    except (OSError, ValueError) as e:
        raise ConfigError(f"Cannot tell this machine's public address ({e}): set client_cidr "
                          f"in the profile to it, like \"203.0.113.7/32\".") from None
    return f"{address}/32"

"""What every cloud backend shares: the VM's bootstrap script, its expiry, its tags, its cost.

A cloud VM must never outlive its use, whatever happens to the client. Three independent
guards see to it:

1. **Its own timers** (in the bootstrap script, no client needed): the VM powers itself off
   ``max_hours`` after boot, and as soon as no engine on it has heard from the client for
   ``idle_timeout`` seconds (engines touch a lease file at each of the client's heartbeats).
   VMs are started so that a shutdown from inside deletes them (EC2: instance-initiated
   shutdown behaviour = terminate; Azure: the VM's own delete-on-shutdown).
2. **Its tags**: cluster, owner and an ``expires-at`` time, so that ``cloudlab gc`` can find
   and delete anything expired or orphaned, from any machine with the credentials.
3. **The client**: a failed or partial start deletes everything it created, and stop
   terminates (never merely stops) every VM.

The bootstrap script is rendered by :func:`render_bootstrap`, a pure function: no secret
goes into it (keys and connection files reach the VM later, over SSH, from the client), and
it stays far below EC2's 16 KB user-data limit.
"""

from __future__ import annotations

import datetime as dt
import getpass
import shlex
import socket
from dataclasses import dataclass

#: EC2 refuses user-data over 16 KB (before base64); Azure's custom data allows 64 KB.
USER_DATA_LIMIT = 16 * 1024
#: Where the bootstrap keeps its state on the VM: its log, the lease file engines touch at
#: each heartbeat from the client (``lease``: _agent's CLOUDLAB_LEASE_FILE), the marker of
#: a finished boot.
STATE_DIR = "/var/lib/cloudlab"
#: Tag keys on every resource cloudlab creates.
TAG_CLUSTER, TAG_OWNER, TAG_EXPIRES = "cloudlab:cluster", "cloudlab:owner", "cloudlab:expires-at"


@dataclass(frozen=True)
class Bootstrap:
    """What a VM's bootstrap needs to know."""

    cluster: str
    #: Shell commands that install Python and cloudlab (the profile's ``install``).
    install: str
    idle_timeout: float  # seconds without a heartbeat before the VM powers off
    max_hours: float  # hours after boot at which the VM powers off regardless
    #: Shell command printing this VM's id (from the cloud's instance metadata).
    instance_id_command: str
    #: Seconds between the watchdog's looks at the lease file.
    check_every: float = 15.0
    state_dir: str = STATE_DIR

    @property
    def lease_file(self) -> str:
        return f"{self.state_dir}/lease"


def render_bootstrap(b: Bootstrap) -> str:
    """The VM's first-boot script (cloud-init runs a user-data script that starts with #!)."""
    max_minutes = max(1, int(b.max_hours * 60))
    idle = max(1, int(b.idle_timeout))
    STATE_DIR, LEASE_FILE = shlex.quote(b.state_dir), shlex.quote(b.lease_file)  # noqa: N806
    script = f"""#!/bin/bash
# cloudlab bootstrap, cluster {b.cluster}: install Python and cloudlab, then keep this VM
# only while its client holds the lease. No secret is in this script: keys and connection
# files arrive later over SSH, from the client.
set -u
mkdir -p {STATE_DIR}
exec >>{STATE_DIR}/bootstrap.log 2>&1
echo "cloudlab bootstrap of {b.cluster} starts at $(date -u +%FT%TZ)"

# 1. Hard expiry, whatever happens next: power off after max_hours (the VM was started so
#    that a shutdown from inside deletes it).
shutdown -P +{max_minutes} "cloudlab: {b.cluster} reached its max_hours" || true

# 2. Idle expiry: power off once no engine has heard from the client for {idle} s. Engines
#    touch the lease file at each heartbeat; the boot itself counts as one.
touch {LEASE_FILE}
cat >{STATE_DIR}/watchdog <<'CLOUDLAB_WATCHDOG'
#!/bin/bash
while sleep {b.check_every:g}; do
  age=$(( $(date +%s) - $(stat -c %Y {LEASE_FILE}) ))
  if [ "$age" -gt {idle} ]; then
    echo "cloudlab: no heartbeat from the client for $age s: powering off"
    shutdown -P now "cloudlab: idle for $age s"
    exit 0
  fi
done
CLOUDLAB_WATCHDOG
chmod 700 {STATE_DIR}/watchdog
nohup {STATE_DIR}/watchdog >>{STATE_DIR}/watchdog.log 2>&1 </dev/null &

# 3. Python and cloudlab.
{b.install.strip() or ':'}

# 4. Ready: the client waits for this marker, named by the VM's id.
instance=$({b.instance_id_command})
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

"""EC2: the SDK calls that create, find and delete a cluster's AWS resources (boto3).

A cluster's resources on AWS, each tagged with its cluster, owner and expiry
(:mod:`._vm`): one key pair (the public half of a key made on the client for this cluster
only), one security group (SSH from the client's own address only, and any traffic between
the cluster's own instances), an instance role for its own queues and tables
(:mod:`.ec2_role`), and its instances, started so that a shutdown from inside terminates
them. :meth:`Ec2.create` deletes whatever it created if any step fails;
:meth:`Ec2.delete` terminates (never merely stops) and removes the rest. What the VMs run
and how engines reach them is the cloud-independent part (:mod:`._vm`).
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

from ..errors import StartError
from ..profiles import option
from . import _vm
from .base import AwsScope
from .ec2_role import InstanceRole, scope

#: Ubuntu 24.04 LTS for x86-64, as Canonical publishes it through SSM (EC2 resolves it).
UBUNTU = "resolve:ssm:/aws/service/canonical/ubuntu/server/24.04/stable/current/amd64/hvm/ebs-gp3/ami-id"
LIVE = ["pending", "running", "stopping", "stopped", "shutting-down"]
PROFILE_PROPAGATION = 60.0  # seconds to wait for EC2 to know a new instance profile


@dataclass(frozen=True)
class Ec2Options(_vm.VmOptions):
    region: str = option("us-east-1", "AWS region.")
    instance_type: str = option("c7i.large", "EC2 instance type.")
    image: str = option(UBUNTU, "AMI id, or resolve:ssm:PARAMETER naming one (default: "
                        "Ubuntu 24.04).")
    subnet_id: str = option("", "Subnet to start instances in (default: the default VPC's).")
    endpoint_url: str = option("", "An EC2-compatible endpoint instead of AWS's.")
    ssh_user: str = option("ubuntu", "User to log in as on the instances.")
    instance_role: bool = option(True, "Give the instances a role of their own that may use "
                                 "this cluster's SQS queues and DynamoDB tables only (the "
                                 "classifier's queue form); false where you may not create "
                                 "IAM roles.")


@dataclass
class Vm:
    id: str
    state: str
    private_ip: str | None
    public_ip: str | None
    launched: float  # epoch seconds
    reason: str = ""  # why it is in that state ("Server.SpotInstanceTermination: ...")
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class Created:
    """What :meth:`Ec2.create` made, for :meth:`Ec2.delete` to remove."""

    cluster: str
    key_name: str | None = None
    group_id: str | None = None
    instance_profile: str | None = None  # its ARN
    instances: list[str] = field(default_factory=list)


class Ec2:
    """A region's EC2 API, with cloudlab's resources in it."""

    def __init__(self, options: Ec2Options):
        import boto3

        self.options = options
        self.client = boto3.client("ec2", region_name=options.region,
                                   endpoint_url=options.endpoint_url or None)

    # ------------------------------------------------------------------ create
    def create(self, cluster: str, count: int, public_key: str, user_data: str,
               client_cidr: str) -> Created:
        """Key pair, security group and ``count`` instances; on any failure, none of them."""
        created = Created(cluster)
        tags = _vm.tags(cluster, self.options.max_hours)
        try:
            created.key_name = f"cloudlab-{cluster}"
            self.client.import_key_pair(
                KeyName=created.key_name, PublicKeyMaterial=public_key.encode(),
                TagSpecifications=[_tag_spec("key-pair", tags)])
            created.group_id = self._security_group(cluster, client_cidr, tags)
            if self.options.instance_role:
                created.instance_profile = self._instance_role(cluster)
            created.instances = self.add_instances(cluster, count, user_data, created)
        except BaseException:
            self.delete(created)
            raise
        return created

    def _security_group(self, cluster: str, client_cidr: str, tags: dict) -> str:
        arguments = {}
        if self.options.subnet_id:
            subnet = self.client.describe_subnets(SubnetIds=[self.options.subnet_id])
            arguments["VpcId"] = subnet["Subnets"][0]["VpcId"]
        group = self.client.create_security_group(
            GroupName=f"cloudlab-{cluster}", TagSpecifications=[_tag_spec("security-group", tags)],
            Description=f"cloudlab cluster {cluster}: SSH from its client, all between its "
                        f"instances", **arguments)["GroupId"]
        self.client.authorize_security_group_ingress(GroupId=group, IpPermissions=[
            {"IpProtocol": "tcp", "FromPort": 22, "ToPort": 22,
             "IpRanges": [{"CidrIp": client_cidr, "Description": "cloudlab client"}]},
            {"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group}]}])
        return group

    def _instance_role(self, cluster: str) -> str:
        from botocore.exceptions import ClientError

        try:
            return self.role.create(cluster, self.options.max_hours)
        except ClientError as e:
            if "AccessDenied" in e.response["Error"]["Code"]:
                raise StartError("You may not create IAM roles here (iam:CreateRole), which "
                                 "the instances' own access to the cluster's queues needs: "
                                 "set instance_role = false in the profile's [ec2] table, or "
                                 "ask your administrator for IAM rights.") from None
            raise

    @functools.cached_property
    def role(self) -> InstanceRole:
        return InstanceRole(self.options.region, self.options.endpoint_url)

    def scope(self, cluster: str) -> AwsScope:
        return scope(cluster, self.options.region, self.options.endpoint_url)

    def add_instances(self, cluster: str, count: int, user_data: str,
                      created: Created) -> list[str]:
        o = self.options
        arguments = {
            "ImageId": o.image, "InstanceType": o.instance_type, "MinCount": count,
            "MaxCount": count, "KeyName": created.key_name,
            "SecurityGroupIds": [created.group_id], "UserData": user_data,
            # A shutdown from inside (the VM's own expiry) deletes the instance.
            "InstanceInitiatedShutdownBehavior": "terminate",
            "TagSpecifications": [
                _tag_spec("instance", _vm.tags(cluster, o.max_hours, f"cloudlab-{cluster}")),
                _tag_spec("volume", _vm.tags(cluster, o.max_hours))],
        }
        if o.subnet_id:
            arguments["SubnetId"] = o.subnet_id
        if created.instance_profile:
            arguments["IamInstanceProfile"] = {"Arn": created.instance_profile}
        if o.spot:
            spot = {"SpotInstanceType": "one-time", "InstanceInterruptionBehavior": "terminate"}
            if o.max_price:
                spot["MaxPrice"] = f"{o.max_price:.4f}"
            arguments["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        reply = self._run_instances(arguments, count)
        ids = [i["InstanceId"] for i in reply["Instances"]]
        created.instances.extend(ids)
        return ids

    def _run_instances(self, arguments: dict, count: int) -> dict:
        # IAM is eventually consistent: for some seconds after it is made, EC2 may not know
        # the instance profile yet.
        deadline = time.monotonic() + PROFILE_PROPAGATION
        while True:
            try:
                return self.client.run_instances(**arguments)
            except Exception as e:
                unknown_profile = ("InvalidParameterValue" in str(e) and
                                   "instance profile" in str(e).lower())
                if not unknown_profile or time.monotonic() > deadline:
                    raise self.explain(e, count) from None
                time.sleep(2)

    # ------------------------------------------------------------------ look
    def describe(self, ids: list[str] | None = None, filters: list | None = None) -> list[Vm]:
        if ids == []:
            return []
        arguments = {"InstanceIds": ids} if ids else {"Filters": filters or []}
        vms = []
        for page in self.client.get_paginator("describe_instances").paginate(**arguments):
            for reservation in page["Reservations"]:
                for i in reservation["Instances"]:
                    reason = i.get("StateReason", {})
                    vms.append(Vm(i["InstanceId"], i["State"]["Name"],
                                  i.get("PrivateIpAddress"), i.get("PublicIpAddress"),
                                  i["LaunchTime"].timestamp(),
                                  f"{reason.get('Code', '')}: {reason.get('Message', '')}"
                                  if reason else "",
                                  _tags_of(i)))
        return vms

    def spot_price(self) -> float | None:
        """The lowest current spot price of the instance type in the region, $/h."""
        try:
            history = self.client.describe_spot_price_history(
                InstanceTypes=[self.options.instance_type], MaxResults=20,
                ProductDescriptions=["Linux/UNIX"])["SpotPriceHistory"]
        except Exception:
            return None
        prices = [float(h["SpotPrice"]) for h in history]
        return min(prices) if prices else None

    def cloudlab_instances(self) -> list[Vm]:
        """Every instance of any cloudlab cluster in this region that is not terminated."""
        return self.describe(filters=[{"Name": "tag-key", "Values": [_vm.TAG_CLUSTER]},
                                      {"Name": "instance-state-name", "Values": LIVE}])

    def cloudlab_groups(self) -> list[dict]:
        return self.client.describe_security_groups(
            Filters=[{"Name": "tag-key", "Values": [_vm.TAG_CLUSTER]}])["SecurityGroups"]

    def cloudlab_key_pairs(self) -> list[dict]:
        return self.client.describe_key_pairs(
            Filters=[{"Name": "tag-key", "Values": [_vm.TAG_CLUSTER]}])["KeyPairs"]

    # ------------------------------------------------------------------ delete
    def terminate(self, ids: list[str], wait: float = 300.0) -> None:
        """Terminate ``ids`` and wait until AWS says so (a security group in use cannot go)."""
        if not ids:
            return
        self.client.terminate_instances(InstanceIds=ids)
        deadline = time.monotonic() + wait
        while any(vm.state != "terminated" for vm in self.describe(ids)):
            if time.monotonic() > deadline:
                raise StartError(f"Instances {', '.join(ids)} were not terminated after "
                                 f"{wait:g} s; check the EC2 console, then run cloudlab gc.")
            time.sleep(2)

    def explain(self, error: Exception, count: int) -> Exception:
        """AWS's refusal to start instances, as one sentence with the fix."""
        code = getattr(error, "response", {}).get("Error", {}).get("Code", "")
        o = self.options
        what = f"{count} x {o.instance_type} in {o.region}"
        fixes = {
            "InsufficientInstanceCapacity": f"AWS has no capacity for {what} right now: try "
                "another instance_type, another region, or a subnet_id in another "
                "availability zone.",
            "VcpuLimitExceeded": f"Your vCPU quota in {o.region} is too small for {what}: ask "
                "for more in the Service Quotas console, or start fewer engines.",
            "MaxSpotInstanceCountExceeded": f"Your spot instance quota in {o.region} is too "
                f"small for {what}: ask for more, or set spot = false.",
            "SpotMaxPriceTooLow": f"The spot price of {o.instance_type} in {o.region} is above "
                f"max_price ({o.max_price:g} $/h): raise max_price, or set it to 0.",
            "UnauthorizedOperation": "Your AWS credentials may not start instances "
                "(ec2:RunInstances): ask your administrator, or use another profile.",
            "InvalidInstanceType": f"Instance type {o.instance_type} does not exist in "
                f"{o.region}: set instance_type in the profile's [ec2] table.",
            "InvalidAMIID.NotFound": f"Image {o.image} does not exist in {o.region}: set image "
                "in the profile's [ec2] table to an AMI of that region.",
            "InvalidAMIID.Malformed": f"Image {o.image!r} is not an AMI id (ami-...) or "
                "resolve:ssm:PARAMETER: fix image in the profile's [ec2] table.",
        }
        if code in fixes:
            return StartError(fixes[code])
        return StartError(f"AWS refused to start {what}: {error}")

    def delete(self, created: Created) -> None:
        """Terminate the instances, then delete the security group and the key pair. Also
        instances started but never reported (a start interrupted while AWS answered),
        found by their cluster tag."""
        tagged = self.describe(filters=[
            {"Name": f"tag:{_vm.TAG_CLUSTER}", "Values": [created.cluster]},
            {"Name": f"tag:{_vm.TAG_OWNER}", "Values": [_vm.owner()]},
            {"Name": "instance-state-name", "Values": LIVE}])
        self.terminate(sorted(set(created.instances) | {vm.id for vm in tagged}))
        created.instances = []
        if created.group_id:
            self.client.delete_security_group(GroupId=created.group_id)
            created.group_id = None
        if created.key_name:
            self.client.delete_key_pair(KeyName=created.key_name)
            created.key_name = None
        if created.instance_profile:
            self.role.delete(created.cluster)
            created.instance_profile = None


class Ec2Backend(_vm.VmBackend):
    """Engines on EC2 instances (the cloud-independent part is :class:`._vm.VmBackend`)."""

    name = "ec2"
    Options = Ec2Options
    #: The instance's id, from its metadata service (IMDSv2: a token first).
    instance_id_command = (
        'curl -sf -H "X-aws-ec2-metadata-token: $(curl -sf -X PUT '
        'http://169.254.169.254/latest/api/token '
        '-H "X-aws-ec2-metadata-token-ttl-seconds: 300")" '
        "http://169.254.169.254/latest/meta-data/instance-id")

    def make_cloud(self) -> Ec2:
        return Ec2(self.options)

    def vcpus(self) -> int:
        reply = self.cloud.client.describe_instance_types(InstanceTypes=[self.options.instance_type])
        return reply["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"]

    def price_per_hour(self) -> float | None:
        if self.options.price_per_hour:
            return self.options.price_per_hour
        if self.options.spot and self.cloud is not None:
            return self.cloud.spot_price()
        return None

    def aws_scope(self) -> AwsScope | None:
        if self.created is None or not self.created.instance_profile:
            return None
        return self.cloud.scope(self.cluster_name)

    def lost(self, vm: Vm) -> str:
        if vm.reason.startswith("Server.SpotInstanceTermination"):
            return f"lost its spot instance {vm.id}: AWS took it back ({vm.reason})"
        return super().lost(vm)

    @classmethod
    def doctor(cls, options: Ec2Options, engines: int) -> list:
        from .ec2_doctor import diagnose

        return diagnose(options, engines)

    @classmethod
    def garbage_place(cls, options: Ec2Options) -> tuple[tuple, str]:
        return (options.region, options.endpoint_url), options.region

    @classmethod
    def collect_garbage(cls, options: Ec2Options, live: set[str], dry_run: bool) -> list[str]:
        return collect_garbage(Ec2(options), live, dry_run=dry_run)


def _tags_of(resource: dict) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in resource.get("Tags", [])}


def _tag_spec(kind: str, tags: dict[str, str]) -> dict:
    return {"ResourceType": kind, "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}


def collect_garbage(ec2: Ec2, live_clusters: set[str], dry_run: bool = False) -> list[str]:
    """Delete expired and orphaned cloudlab resources in the region (:func:`_vm.why_garbage`):
    instances first, then the security groups and key pairs no instance of theirs still
    uses. One line per resource, saying what and why."""
    said = []
    doomed = []
    keep = set()  # clusters with an instance that stays
    for vm in ec2.cloudlab_instances():
        why = _vm.why_garbage(vm.tags, live_clusters)
        if why:
            doomed.append(vm.id)
            said.append(f"instance {vm.id} ({vm.state}, cluster "
                        f"{vm.tags.get(_vm.TAG_CLUSTER)}): {why}")
        else:
            keep.add(vm.tags.get(_vm.TAG_CLUSTER))
    if doomed and not dry_run:
        ec2.terminate(doomed)
    # Then what only the doomed instances used: the clusters' groups and key pairs.
    others = [(f"security group {g['GroupId']} ({g['GroupName']})", g,
               lambda g=g: ec2.client.delete_security_group(GroupId=g["GroupId"]))
              for g in ec2.cloudlab_groups()]
    others += [(f"key pair {k['KeyName']}", k,
                lambda k=k: ec2.client.delete_key_pair(KeyName=k["KeyName"]))
               for k in ec2.cloudlab_key_pairs()]
    for what, resource, delete in others:
        tags = _tags_of(resource)
        why = _vm.why_garbage(tags, live_clusters)
        if why and tags[_vm.TAG_CLUSTER] not in keep:
            said.append(f"{what}: {why}")
            if not dry_run:
                delete()
    role = ec2.role
    for cluster, tags in role.clusters().items():
        why = _vm.why_garbage(tags, live_clusters)
        if why and cluster not in keep:
            said.append(f"instance role cloudlab-{cluster}: {why}")
            if not dry_run:
                role.delete(cluster)
    return said

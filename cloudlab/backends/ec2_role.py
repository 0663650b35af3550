"""A cluster's instance role: how its VMs use AWS services without the client's credentials.

The role may use SQS queues and DynamoDB tables whose names start ``cloudlab-CLUSTER-``
and nothing else, so a VM can work a queue the client made for the cluster (the
classifier's queue form) and can touch no other resource in the account. The VMs get
short-lived credentials for it from their metadata service, as AWS hands them to any
instance with a profile; nothing secret travels in their user-data. The role, its policy
and its instance profile are made at start and deleted at stop, with any queue or table of
the cluster a run left behind; ``cloudlab gc`` finds forgotten ones by their path.
"""

from __future__ import annotations

import json

from . import _vm
from .base import AwsScope

PATH = "/cloudlab/"  # the role's and the profile's: what gc lists
POLICY = "cluster-queues"
#: What a worker does to a queue and a table; the client itself creates and deletes them.
ACTIONS = ["sqs:ReceiveMessage", "sqs:DeleteMessage", "sqs:ChangeMessageVisibility",
           "sqs:GetQueueAttributes", "sqs:SendMessage", "dynamodb:BatchWriteItem",
           "dynamodb:PutItem", "dynamodb:DescribeTable"]


def prefix(cluster: str) -> str:
    """What the names of the queues and tables the cluster's role may use start with."""
    return f"cloudlab-{cluster}-"


def scope(cluster: str, region: str, endpoint: str | None) -> AwsScope:
    return AwsScope(region, endpoint or None, prefix(cluster))


def policy(cluster: str, region: str) -> dict:
    names = prefix(cluster) + "*"
    return {"Version": "2012-10-17", "Statement": [{
        "Effect": "Allow", "Action": ACTIONS,
        "Resource": [f"arn:aws:sqs:{region}:*:{names}",
                     f"arn:aws:dynamodb:{region}:*:table/{names}"]}]}


TRUST = {"Version": "2012-10-17", "Statement": [{
    "Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"},
    "Action": "sts:AssumeRole"}]}


class InstanceRole:
    """Make and delete one cluster's role and instance profile (both named cloudlab-CLUSTER)."""

    def __init__(self, region: str, endpoint: str | None):
        import boto3

        self.region, self.endpoint = region, endpoint or None
        self.iam = boto3.client("iam", region_name=region, endpoint_url=self.endpoint)

    def create(self, cluster: str, max_hours: float) -> str:
        """The instance profile's ARN; on any failure, nothing is left."""
        name = f"cloudlab-{cluster}"
        tags = [{"Key": k, "Value": v} for k, v in _vm.tags(cluster, max_hours).items()]
        try:
            self.iam.create_role(
                RoleName=name, Path=PATH, AssumeRolePolicyDocument=json.dumps(TRUST), Tags=tags,
                Description=f"cloudlab cluster {cluster}: its own queues and tables only")
            self.iam.put_role_policy(RoleName=name, PolicyName=POLICY,
                                     PolicyDocument=json.dumps(policy(cluster, self.region)))
            profile = self.iam.create_instance_profile(InstanceProfileName=name, Path=PATH,
                                                       Tags=tags)["InstanceProfile"]
            self.iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)
        except BaseException:
            self.delete(cluster)
            raise
        return profile["Arn"]

    def delete(self, cluster: str) -> None:
        """The role, its profile, and the queues and tables of the cluster left behind."""
        from botocore.exceptions import ClientError

        name = f"cloudlab-{cluster}"
        steps = [lambda: self.iam.remove_role_from_instance_profile(InstanceProfileName=name,
                                                                      RoleName=name),
                 lambda: self.iam.delete_instance_profile(InstanceProfileName=name),
                 lambda: self.iam.delete_role_policy(RoleName=name, PolicyName=POLICY),
                 lambda: self.iam.delete_role(RoleName=name)]
        for step in steps:
            try:
                step()
            except ClientError as e:
                if e.response["Error"]["Code"] != "NoSuchEntity":
                    raise
        self._delete_leftovers(cluster)

    def _delete_leftovers(self, cluster: str) -> None:
        import boto3
        from botocore.exceptions import ClientError

        sqs = boto3.client("sqs", region_name=self.region, endpoint_url=self.endpoint)
        dynamodb = boto3.client("dynamodb", region_name=self.region, endpoint_url=self.endpoint)
        try:
            for url in sqs.list_queues(QueueNamePrefix=prefix(cluster)).get("QueueUrls", []):
                sqs.delete_queue(QueueUrl=url)
            for page in dynamodb.get_paginator("list_tables").paginate():
                for table in page["TableNames"]:
                    if table.startswith(prefix(cluster)):
                        dynamodb.delete_table(TableName=table)
        except ClientError as e:  # a client without SQS or DynamoDB rights made none
            if "AccessDenied" not in e.response["Error"]["Code"]:
                raise

    def clusters(self) -> dict[str, dict[str, str]]:
        """Cluster name -> the tags of every role cloudlab made in the account."""
        from botocore.exceptions import ClientError

        found = {}
        try:
            for page in self.iam.get_paginator("list_roles").paginate(PathPrefix=PATH):
                for role in page["Roles"]:
                    tags = self.iam.list_role_tags(RoleName=role["RoleName"])["Tags"]
                    tags = {t["Key"]: t["Value"] for t in tags}
                    if _vm.TAG_CLUSTER in tags:
                        found[tags[_vm.TAG_CLUSTER]] = tags
        except ClientError as e:  # a client without IAM rights made no role
            if "AccessDenied" not in e.response["Error"]["Code"]:
                raise
        return found

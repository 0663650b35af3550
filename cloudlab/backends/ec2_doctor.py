"""`cloudlab doctor --profile aws-cpu`: will a start work? Asked of AWS in seconds, before
anything is created, one line per check, and one fix per failure.

Credentials, region, image, instance type, permission to start the instances (a DryRun RunInstances:
AWS answers as for a real start, without starting anything), vCPU quota, the size of the
bootstrap, this machine's address for the SSH rule, and the local ssh tools.
"""

from __future__ import annotations

import math

from ._doctor import Check, bootstrap_size, checker, local_tools, ssh_rule
from .ec2 import Ec2, Ec2Backend, Ec2Options

#: Service Quotas' code for "Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances".
STANDARD_VCPU_QUOTA = "L-1216C47A"


def _code(error: Exception) -> str:
    return getattr(error, "response", {}).get("Error", {}).get("Code", type(error).__name__)


def diagnose(options: Ec2Options, engines: int) -> list[Check]:
    """Every check, in order; a failure does not stop the later ones where they can run."""
    checks: list[Check] = []
    check = checker(checks, _code)
    api = Ec2(options)
    if not check("credentials", lambda: _credentials(options)):
        return checks  # nothing else can be asked
    check("region", lambda: _region(api))
    image: dict[str, str] = {}
    check("image", lambda: _image(api, image))
    vcpus: dict[str, int] = {}
    check("instance type", lambda: _instance_type(api, vcpus))
    check("permission to start", lambda: _dry_run(api, image.get("id")))
    check("vCPU quota", lambda: _quota(api, engines, vcpus.get("count")))
    check("bootstrap size", lambda: bootstrap_size(options, Ec2Backend.instance_id_command))
    check("SSH rule", lambda: ssh_rule(options))
    check("local tools", local_tools)
    return checks


def _credentials(options: Ec2Options):
    import boto3
    from botocore.exceptions import NoCredentialsError

    sts = boto3.client("sts", region_name=options.region,
                       endpoint_url=options.endpoint_url or None)
    try:
        who = sts.get_caller_identity()
    except NoCredentialsError:
        return False, ("no AWS credentials found: run `aws configure` (or `aws sso login`), "
                       "or set AWS_PROFILE.")
    return True, f"{who['Arn']} (account {who['Account']})"


def _region(api: Ec2):
    zones = api.client.describe_availability_zones()["AvailabilityZones"]
    return True, f"{api.options.region}, {len(zones)} availability zones"


def _image(api: Ec2, found: dict):
    image = api.options.image
    if image.startswith("resolve:ssm:"):
        import boto3

        ssm = boto3.client("ssm", region_name=api.options.region,
                           endpoint_url=api.options.endpoint_url or None)
        name = image.removeprefix("resolve:ssm:")
        try:
            image = ssm.get_parameter(Name=name)["Parameter"]["Value"]
        except Exception as e:
            return False, (f"SSM parameter {name} cannot be read ({_code(e)}): set image in "
                           f"the profile's [ec2] table to an AMI id of {api.options.region}.")
    try:
        described = api.client.describe_images(ImageIds=[image])["Images"]
    except Exception as e:
        described, code = [], _code(e)
    else:
        code = "not found"
    if not described:
        return False, (f"image {image} does not exist in {api.options.region} ({code}): set "
                       f"image in the profile's [ec2] table to an AMI of that region.")
    found["id"] = image
    return True, f"{image} ({described[0].get('Name', 'no name')})"


def _dry_run(api: Ec2, image: str | None):
    if image is None:
        return None, "not checked: no image to try"
    o = api.options
    try:
        api.client.run_instances(ImageId=image, InstanceType=o.instance_type, MinCount=1,
                                 MaxCount=1, DryRun=True)
    except Exception as e:
        if _code(e) == "DryRunOperation":
            return True, f"RunInstances of {o.instance_type} would be allowed (DryRun)"
        return False, str(api.explain(e, 1))
    return False, "AWS started an instance on a DryRun request: check endpoint_url."


def _instance_type(api: Ec2, found: dict):
    o = api.options
    try:
        described = api.client.describe_instance_types(InstanceTypes=[o.instance_type])
    except Exception as e:
        if _code(e) not in ("InvalidInstanceType", "InvalidParameterValue"):
            raise
        return False, (f"instance type {o.instance_type} does not exist in {o.region}: set "
                       f"instance_type in the profile's [ec2] table (`aws ec2 "
                       f"describe-instance-types` lists them).")
    found["count"] = described["InstanceTypes"][0]["VCpuInfo"]["DefaultVCpus"]
    return True, f"{o.instance_type}: {found['count']} vCPUs"


def _quota(api: Ec2, engines: int, vcpus: int | None):
    import boto3

    o = api.options
    if vcpus is None:
        return None, "not checked: the instance type is not known"
    per_instance = o.engines_per_instance or vcpus
    needed = math.ceil(engines / per_instance) * vcpus
    quotas = boto3.client("service-quotas", region_name=o.region,
                          endpoint_url=o.endpoint_url or None)
    try:
        quota = quotas.get_service_quota(ServiceCode="ec2", QuotaCode=STANDARD_VCPU_QUOTA)
    except Exception as e:
        return None, f"not checked: the quota cannot be read here ({_code(e)})"
    limit = quota["Quota"]["Value"]
    if needed > limit:
        return False, (f"{engines} engines need {needed:g} vCPUs of {o.instance_type}, over "
                       f"your quota of {limit:g} in {o.region}: ask for more in the Service "
                       f"Quotas console, or start fewer engines.")
    return True, f"{needed:g} vCPUs needed of {limit:g} ({o.instance_type})"

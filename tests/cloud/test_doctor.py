"""`cloudlab doctor` against moto_server: every check passes for a usable profile, and each
failure (no credentials, a missing image, a quota too small: the last through botocore's
Stubber, since moto has no EC2 quotas) is one line with its fix."""

import os
import subprocess
import sys

import boto3
import pytest
from botocore.stub import Stubber

from cloudlab.backends import ec2_doctor
from cloudlab.backends.ec2 import Ec2, Ec2Options


@pytest.fixture
def options(moto_endpoint):
    ami = Ec2(Ec2Options(endpoint_url=moto_endpoint)).client.describe_images(
        Owners=["amazon"])["Images"][0]["ImageId"]
    return {"endpoint_url": moto_endpoint, "image": ami, "client_cidr": "203.0.113.7/32"}


def _doctor(profile, env=None):
    return subprocess.run([sys.executable, "-m", "cloudlab.cli", "doctor", "--profile", profile],
                          capture_output=True, text=True, timeout=120, env=env)


def test_a_usable_profile_passes_every_check_it_can_make(options, write_profile):
    done = _doctor(write_profile("doctor-test", options, engines=8))
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("ok   credentials: arn:aws:sts::123456789012:")
    assert f"ok   image: {options['image']}" in done.stdout
    assert "ok   permission to start: RunInstances of c7i.large would be allowed (DryRun)" in lines
    assert "ok   SSH rule: SSH (port 22) open to 203.0.113.7/32 only" in lines
    assert any(line.startswith("--   vCPU quota: not checked") for line in lines)  # moto
    assert "ok   instance type: c7i.large: 2 vCPUs" in lines
    assert lines[-1].startswith("9 of 9 checks passed in ")  # (a -- line is not a failure)


def test_missing_credentials_say_how_to_get_them(options, write_profile):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")
    done = _doctor(write_profile("doctor-test", options), env)
    assert done.returncode == 1
    assert ("FAIL credentials: no AWS credentials found: run `aws configure` (or `aws sso "
            "login`), or set AWS_PROFILE.") in done.stdout.splitlines()


def test_a_missing_image_fails_with_its_fix(options, write_profile):
    done = _doctor(write_profile("doctor-test", {**options, "image": "ami-0123456789abcdef0"}))
    assert done.returncode == 1
    assert ("FAIL image: image ami-0123456789abcdef0 does not exist in us-east-1 "
            "(InvalidAMIID.NotFound): set image in the profile's [ec2] table to an AMI of that "
            "region.") in done.stdout.splitlines()
    assert "--   permission to start: not checked: no image to try" in done.stdout


def test_an_instance_type_that_does_not_exist_fails_with_its_fix(options):
    checks = ec2_doctor.diagnose(Ec2Options(**options, instance_type="c7i.huge"), engines=4)
    said = [str(c) for c in checks]
    assert ("FAIL instance type: instance type c7i.huge does not exist in us-east-1: set "
            "instance_type in the profile's [ec2] table (`aws ec2 describe-instance-types` "
            "lists them).") in said
    assert "--   vCPU quota: not checked: the instance type is not known" in said


def test_a_quota_too_small_fails_with_its_fix(options, monkeypatch):
    real = boto3.client
    quotas = real("service-quotas", region_name="us-east-1")
    stubber = Stubber(quotas)
    stubber.add_response("get_service_quota", {"Quota": {"Value": 4.0}},
                         {"ServiceCode": "ec2", "QuotaCode": ec2_doctor.STANDARD_VCPU_QUOTA})
    stubber.activate()
    monkeypatch.setattr(boto3, "client", lambda name, **kw: quotas if name == "service-quotas"
                        else real(name, **kw))
    checks = ec2_doctor.diagnose(Ec2Options(**options), engines=16)
    quota = next(c for c in checks if c.name == "vCPU quota")
    assert quota.ok is False
    # (one engine per vCPU: 8 instances of 2 vCPUs)
    assert quota.detail == ("16 engines need 16 vCPUs of c7i.large, over your quota of 4 in "
                            "us-east-1: ask for more in the Service Quotas console, or start "
                            "fewer engines.")


def test_gc_without_credentials_says_so_in_one_line(options, write_profile):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE="/nonexistent", AWS_CONFIG_FILE="/nonexistent",
               AWS_EC2_METADATA_DISABLED="true")
    done = subprocess.run([sys.executable, "-m", "cloudlab.cli", "gc", "--profile",
                           write_profile("gc-test", options)], capture_output=True, text=True,
                          timeout=60, env=env)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("cloudlab gc: cannot clean us-east-1 (NoCredentialsError: ")
    assert len(done.stderr.splitlines()) == 1

"""Create the two instance profiles cluster.yaml names (gpa-ray-head, gpa-ray-worker), once
per AWS account, with the least the cluster needs:

- head: launch, tag, stop and terminate the worker instances (the autoscaler runs there),
  pass the worker role to them, read the public SSM parameters of the Deep Learning AMIs
  (EC2 resolves cluster.yaml's `resolve:ssm:` ImageId with the launcher's rights), and
  read/write the bucket;
- worker: read/write the bucket.

    python deploy/aws/iam.py --bucket my-bucket

Idempotent: a second run updates the policies and keeps what exists. Uses the AWS SDK's
usual credentials (your profile or environment); writes no keys anywhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json

HEAD = "gpa-ray-head"
WORKER = "gpa-ray-worker"
DLAMI_PARAMETERS = "arn:aws:ssm:*::parameter/aws/service/deeplearning/*"
EC2_TRUST = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


def bucket_statements(bucket: str) -> list[dict]:
    return [
        {"Effect": "Allow", "Action": "s3:ListBucket", "Resource": f"arn:aws:s3:::{bucket}"},
        {
            "Effect": "Allow",
            "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            "Resource": f"arn:aws:s3:::{bucket}/*",
        },
    ]


def policies(bucket: str) -> dict[str, dict]:
    """The inline policy of each role."""
    head = [
        {
            "Effect": "Allow",
            "Action": [
                "ec2:RunInstances",
                "ec2:StartInstances",
                "ec2:StopInstances",
                "ec2:TerminateInstances",
                "ec2:CreateTags",
                "ec2:DeleteTags",
                "ec2:Describe*",
            ],
            "Resource": "*",
        },
        {"Effect": "Allow", "Action": "iam:PassRole", "Resource": f"arn:aws:iam::*:role/{WORKER}"},
        {
            "Effect": "Allow",
            "Action": ["ssm:GetParameter", "ssm:GetParameters"],
            "Resource": DLAMI_PARAMETERS,
        },
        *bucket_statements(bucket),
    ]
    return {
        HEAD: {"Version": "2012-10-17", "Statement": head},
        WORKER: {"Version": "2012-10-17", "Statement": bucket_statements(bucket)},
    }


def ensure(iam, bucket: str) -> None:
    """Create or update both roles, their policies and their instance profiles."""
    for name, policy in policies(bucket).items():
        exists = iam.exceptions.EntityAlreadyExistsException
        with contextlib.suppress(exists):
            iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(EC2_TRUST))
        iam.put_role_policy(RoleName=name, PolicyName=name, PolicyDocument=json.dumps(policy))
        with contextlib.suppress(exists):
            iam.create_instance_profile(InstanceProfileName=name)
        roles = iam.get_instance_profile(InstanceProfileName=name)["InstanceProfile"]["Roles"]
        if not any(role["RoleName"] == name for role in roles):
            iam.add_role_to_instance_profile(InstanceProfileName=name, RoleName=name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bucket", required=True, help="the bucket the cluster reads/writes")
    args = parser.parse_args(argv)
    if args.bucket.startswith("s3://") or "/" in args.bucket:
        parser.error(f"--bucket {args.bucket}: a bucket name, without s3:// or a prefix")
    import boto3

    ensure(boto3.client("iam"), args.bucket)
    print(f"instance profiles {HEAD} and {WORKER} ready for bucket {args.bucket}")


if __name__ == "__main__":
    main()

"""Real services on loopback for tests and benchmarks: the shared embedded Ray, a local S3
server (and one that checks signatures), free ports (`free_loopback_ports`, from
`gpa_ray.local_ray`).

`tests/conftest.py` imports this module for every session, so `ray` (~1-3 s) and moto's
server (~3 s) are imported only by the helpers that start them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gpa_ray.config import StorageConfig
from gpa_ray.credentials import export_storage_credentials
from gpa_ray.jobs_cli import set_ray_process_env
from gpa_ray.local_ray import free_loopback_ports as free_loopback_ports
from gpa_ray.local_ray import start_local_ray as start_pinned_local_ray

TEST_BUCKET = "gpa-ray-test"
TEST_S3_STORAGE = StorageConfig(
    region="us-east-1", access_key_id="testing", secret_access_key="testing"
)
"""The local S3 server's region and credentials (moto accepts any key when it does not
check signatures); `local_s3_server` adds its endpoint."""


def loopback_ray_env() -> None:
    """Environment that keeps a local Ray without token auth (tests only; loopback and its
    own ports come with `gpa_ray.local_ray`), plus the project's own Ray process
    environment (what the jobs run with), and the test S3 server's credentials as `AWS_*`
    variables: a config's credentials never travel with a Ray task, so the shared test
    Ray's workers find them where a cluster's would, in their environment (variables the
    user already set win)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "AWS_ACCESS_KEY_ID" not in os.environ:
        export_storage_credentials(TEST_S3_STORAGE)
    set_ray_process_env()


def start_local_ray(num_cpus: int = 2) -> str:
    """Start (or join) the one embedded local Ray that a test session shares, on loopback
    with its own ports and address pinned as a job's (`gpa_ray.local_ray`); its GCS address.
    """
    loopback_ray_env()
    return start_pinned_local_ray(
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=True,
        object_store_memory=512 * 1024 * 1024,
    )


@dataclass(frozen=True)
class S3Server:
    """A running S3 HTTP endpoint on loopback and the storage config that reaches it."""

    endpoint_url: str
    bucket: str
    storage: StorageConfig

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *[p.strip("/") for p in parts]])

    def overrides(self) -> list[str]:
        """Dotted config overrides that point a job's `storage` section at this server."""
        s = self.storage
        return [
            f"storage.endpoint_url={s.endpoint_url}",
            f"storage.region={s.region}",
            f"storage.access_key_id={s.access_key_id}",
            f"storage.secret_access_key={s.secret_access_key}",
        ]


@contextmanager
def local_s3_server(bucket: str = TEST_BUCKET) -> Iterator[S3Server]:
    """Run moto's real S3 server on 127.0.0.1 (free port) with one bucket created."""
    import boto3  # deferred (with moto): heavy, see the module docstring
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        storage = dataclasses.replace(TEST_S3_STORAGE, endpoint_url=endpoint)
        boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name=storage.region,
            aws_access_key_id=storage.access_key_id,
            aws_secret_access_key=storage.secret_access_key,
        ).create_bucket(Bucket=bucket)
        yield S3Server(endpoint_url=endpoint, bucket=bucket, storage=storage)
    finally:
        server.stop()


@contextmanager
def authenticated_s3_server(bucket: str = TEST_BUCKET) -> Iterator[S3Server]:
    """moto's S3 server in its own process, checking every request's signature: one
    bucket, a role allowed `s3:*`, and temporary credentials of that role (key, secret and
    session token, random strings minted by the server) in the returned storage config. A
    request signed with anything else, or not signed, is refused, so a process that
    reaches this server proves it was handed these credentials."""
    import boto3  # deferred: heavy, see the module docstring

    (port,) = free_loopback_ports(1)
    endpoint = f"http://127.0.0.1:{port}"
    # The first 4 requests (bucket, role, role policy, assume-role) need no signature.
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
    moto_server = os.path.join(os.path.dirname(sys.executable), "moto_server")
    proc = subprocess.Popen(
        [moto_server, "-H", "127.0.0.1", "-p", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        _wait_for_port(port, proc, timeout=30.0)
        unchecked = {
            "endpoint_url": endpoint,
            "region_name": TEST_S3_STORAGE.region,
            "aws_access_key_id": "setup",
            "aws_secret_access_key": "setup",
        }
        boto3.client("s3", **unchecked).create_bucket(Bucket=bucket)
        iam = boto3.client("iam", **unchecked)
        trust = {
            "Version": "2012-10-17",
            "Statement": [
                {"Effect": "Allow", "Principal": {"AWS": "*"}, "Action": "sts:AssumeRole"}
            ],
        }
        role = iam.create_role(RoleName="gpa-ray-test", AssumeRolePolicyDocument=json.dumps(trust))
        allow_s3 = {
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
        }
        iam.put_role_policy(
            RoleName="gpa-ray-test", PolicyName="s3", PolicyDocument=json.dumps(allow_s3)
        )
        creds = boto3.client("sts", **unchecked).assume_role(
            RoleArn=role["Role"]["Arn"], RoleSessionName="gpa-ray-test"
        )["Credentials"]
        storage = StorageConfig(
            endpoint_url=endpoint,
            region=TEST_S3_STORAGE.region,
            access_key_id=creds["AccessKeyId"],
            secret_access_key=creds["SecretAccessKey"],
            session_token=creds["SessionToken"],
        )
        yield S3Server(endpoint_url=endpoint, bucket=bucket, storage=storage)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Return once 127.0.0.1:`port` accepts connections; fail if `proc` exits first."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the S3 server exited with {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no S3 server on 127.0.0.1:{port} after {timeout} s") from None
            time.sleep(0.2)

"""Helpers for tests and demos: the shared local Ray, the local S3 server, real test data.

These are real components (a real Ray cluster on loopback, a real S3 HTTP endpoint from
moto's server, real audio from the shared data folder), sized for a 2-core machine.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from gpa_ray.config import StorageConfig

SHARED_DATA_ENV = "GPA_RAY_SHARED_DATA"
TEST_BUCKET = "gpa-ray-test"


def shared_data_dir() -> Path:
    """Folder of real test audio: `$GPA_RAY_SHARED_DATA`, else `../shared/data` from the repo."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def loopback_ray_env() -> None:
    """Environment that keeps a local Ray on 127.0.0.1 and without token auth (tests only)."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def start_local_ray(num_cpus: int = 2) -> None:
    """Start (or join) the one embedded local Ray that a test session shares."""
    import ray

    loopback_ray_env()
    if not ray.is_initialized():
        ray.init(
            address="local",
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


@contextmanager
def local_s3_server(bucket: str = TEST_BUCKET) -> Iterator[S3Server]:
    """Run moto's real S3 server on 127.0.0.1 (free port) with one bucket created."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        creds = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(
            Bucket=bucket
        )
        storage = StorageConfig(
            endpoint_url=endpoint,
            region="us-east-1",
            access_key_id="testing",
            secret_access_key="testing",
        )
        yield S3Server(endpoint_url=endpoint, bucket=bucket, storage=storage)
    finally:
        server.stop()

"""Real services on loopback for tests and benchmarks: the shared embedded Ray, a local S3
server, free ports (`free_loopback_ports`, from `gpa_ray.local_ray`).

`tests/conftest.py` imports this module for every session, so `ray` (~1-3 s) and moto's
server (~3 s) are imported only by the helpers that start them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from gpa_ray.config import StorageConfig
from gpa_ray.jobs_cli import set_ray_process_env
from gpa_ray.local_ray import free_loopback_ports as free_loopback_ports
from gpa_ray.local_ray import start_local_ray as start_pinned_local_ray

TEST_BUCKET = "gpa-ray-test"


def loopback_ray_env() -> None:
    """Environment that keeps a local Ray without token auth (tests only; loopback and its
    own ports come with `gpa_ray.local_ray`), plus the project's own Ray process
    environment (what the jobs run with)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
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

"""Session fixtures: one shared local Ray, one local S3 server, the real test audio."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpa_ray import testing


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real audio folder; on CI a missing folder fails instead of skipping."""
    path = testing.shared_data_dir()
    if not (path / "esc50").is_dir():
        message = f"real test data not found at {path} (set {testing.SHARED_DATA_ENV})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One embedded local Ray (2 CPUs, loopback, no dashboard) for the whole session."""
    import ray

    testing.start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[testing.S3Server]:
    """A real S3 HTTP endpoint (moto server) on 127.0.0.1 with a test bucket."""
    with testing.local_s3_server() as server:
        yield server

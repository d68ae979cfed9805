"""Ingest under storage faults: s3 -> s3 through a misbehaving proxy (503 SlowDown and
connections reset mid-body) gives exactly the clips and the errors of a clean run."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest

from gpa_ray import storage
from gpa_ray.config_loading import load_config
from gpa_ray.data.ingest import ClipEncoder
from gpa_ray.testing.data import esc50_records
from gpa_ray.testing.faulty_proxy import faulty_proxy
from gpa_ray.testing.jobs import job_main
from gpa_ray.testing.services import S3Server

N_CLIPS = 9
MISSING = 4
"""Index of a clip whose audio is not uploaded: a permanent failure, at `locate`."""


def _esc50_on_s3(shared_data: Path, s3_server: S3Server) -> str:
    """A 9-clip ESC-50 corpus (its CSV and audio) on the S3 server, one file missing."""
    root = s3_server.uri("faults", "esc50")
    records = esc50_records(shared_data / "esc50")[:N_CLIPS]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    s3 = s3_server.storage
    storage.write_bytes(storage.join(root, "meta", "esc50.csv"), text.getvalue().encode(), s3)
    for i, record in enumerate(records):
        if i != MISSING:
            data = (shared_data / "esc50" / "audio" / record["filename"]).read_bytes()
            storage.write_bytes(storage.join(root, "audio", record["filename"]), data, s3)
    return root


def _outcome(out: str, s3: S3Server) -> tuple[dict[str, list], dict[str, str]]:
    clips = storage.read_parquet(storage.join(out, "clips"), s3.storage).to_pylist()
    errors = storage.read_parquet(storage.join(out, "errors"), s3.storage).to_pylist()
    return (
        {c["clip_id"]: np.array(c["codes"]).tolist() for c in clips},
        {e["clip_id"]: e["stage"] for e in errors},
    )


@pytest.mark.s3
def test_ingest_through_a_faulty_proxy_equals_a_clean_run(
    ray_session: None, shared_data: Path, s3_server: S3Server
) -> None:
    root = _esc50_on_s3(shared_data, s3_server)
    common = [
        "corpus.kind=esc50",
        f"corpus.root={root}",
        "ingest.max_seconds=1.0",
        "ingest.rows_per_commit=3",
        "ingest.encode_pool.actors=1",
        "ingest.store_audio=false",
    ]
    clean = s3_server.uri("faults", "clean")
    assert job_main("ingest")([*common, *s3_server.overrides(), f"ingest.output={clean}"]) == 0
    faulty = s3_server.uri("faults", "faulty")
    with faulty_proxy(s3_server.endpoint_url, slow_down=0.1, reset=0.05, seed=3) as proxy:
        through_proxy = [*s3_server.overrides(), f"storage.endpoint_url={proxy.endpoint}"]
        assert job_main("ingest")([*common, *through_proxy, f"ingest.output={faulty}"]) == 0
    assert proxy.counts.total > 50 and proxy.counts.faulty_share >= 0.10, proxy.counts
    clips, errors = _outcome(faulty, s3_server)
    assert (clips, errors) == _outcome(clean, s3_server)
    assert len(clips) == N_CLIPS - 1 and list(errors.values()) == ["locate"]  # only the missing one


@pytest.mark.s3
def test_the_proxy_throttles_and_resets_and_the_client_retries(s3_server: S3Server) -> None:
    uri = s3_server.uri("faults", "blob.bin")
    data = bytes(range(256)) * 4096  # 1 MiB
    storage.write_bytes(uri, data, s3_server.storage)
    with faulty_proxy(s3_server.endpoint_url, slow_down=1.0, reset=0.0) as proxy:
        cfg = dataclasses.replace(s3_server.storage, endpoint_url=proxy.endpoint, max_attempts=2)
        with pytest.raises(storage.StorageError, match="SLOW_DOWN|503|Please reduce"):
            storage.read_bytes(uri, cfg)
    assert proxy.counts.slow_down >= 2 and proxy.counts.forwarded == 0  # retried, then gave up
    with faulty_proxy(s3_server.endpoint_url, slow_down=0.3, reset=0.3, seed=1) as proxy:
        cfg = dataclasses.replace(s3_server.storage, endpoint_url=proxy.endpoint, max_attempts=20)
        assert all(storage.read_bytes(uri, cfg) == data for _ in range(5))
    assert proxy.counts.slow_down > 0 and proxy.counts.reset > 0


@pytest.mark.s3
def test_a_read_that_outlasts_the_retries_fails_the_unit_not_the_clip(
    s3_server: S3Server,
) -> None:
    """Transient is never recorded as permanent: no `read` error row, the unit raises."""
    uri = s3_server.uri("faults", "clip.wav")
    storage.write_bytes(uri, b"RIFF....", s3_server.storage)
    with faulty_proxy(s3_server.endpoint_url, slow_down=1.0, reset=0.0) as proxy:
        overrides = [*s3_server.overrides(), f"storage.endpoint_url={proxy.endpoint}"]
        encoder = ClipEncoder(load_config(overrides=[*overrides, "storage.max_attempts=2"]))
        with pytest.raises(storage.StorageError, match="after 2 attempts"):
            encoder.fetch({"source_uri": uri})

"""The training data reader under storage faults: clip shards read from s3:// through a
misbehaving proxy (503 SlowDown, connections reset mid-body) give exactly the rows of a
clean read, in the same order: transient errors are retried with the storage config's
retry strategy inside Ray Data's read tasks, never dropped."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
from typing import Any

import pytest

from gpa_ray import storage
from gpa_ray.config import Config
from gpa_ray.testing.faulty_proxy import faulty_proxy
from gpa_ray.testing.models import tiny_gpa_run_config
from gpa_ray.testing.services import S3Server
from gpa_ray.train.gpa_loop import GPALoop
from gpa_ray.train.trainer import clip_datasets

from .conftest import SPLITS


def _config(data: str, s3: S3Server, endpoint: str, max_attempts: int) -> Config:
    base = tiny_gpa_run_config("unused-text-model")
    storage_cfg = dataclasses.replace(s3.storage, endpoint_url=endpoint, max_attempts=max_attempts)
    train = dataclasses.replace(base.train, data=data, corpus="esc50", seed=5)
    return dataclasses.replace(base, storage=storage_cfg, train=train)


def _rows(cfg: Config) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of the GPA run's train and val datasets, as the workers would get them
    (clip id, captions, SHA-256 of the FLAC bytes), in dataset order."""
    datasets = clip_datasets(GPALoop(cfg))
    return {
        name: [
            (r["clip_id"], tuple(r["captions"]), hashlib.sha256(r["audio"]).hexdigest())
            for r in dataset.iter_rows()
        ]
        for name, dataset in datasets.items()
    }


@pytest.mark.s3
def test_training_reader_through_a_faulty_proxy_reads_every_row_of_a_clean_read(
    ray_session: None, write_esc50_shards: Any, s3_server: S3Server
) -> None:
    data = write_esc50_shards(s3_server.uri("train-faults", "ingest"), s3_server.storage)
    clean = _rows(_config(data, s3_server, s3_server.endpoint_url, max_attempts=10))
    assert [len(clean[name]) for name in ("train", "val")] == list(SPLITS.values())
    with faulty_proxy(s3_server.endpoint_url, slow_down=0.2, reset=0.1, seed=11) as proxy:
        faulty = _rows(_config(data, s3_server, proxy.endpoint, max_attempts=10))
    assert proxy.counts.total > 40 and proxy.counts.faulty_share >= 0.15, proxy.counts
    assert proxy.counts.slow_down > 0 and proxy.counts.reset > 0
    assert faulty == clean


@pytest.mark.s3
def test_read_tasks_retry_as_configured(s3_server: S3Server) -> None:
    """Ray Data pickles the filesystem into its read tasks; the copy a task unpickles
    makes `storage.max_attempts` attempts (pyarrow's own pickling would fall back to 3)."""
    uri = s3_server.uri("train-faults", "blob.bin")
    storage.write_bytes(uri, b"clip shard bytes", s3_server.storage)
    attempts = []
    for max_attempts in (2, 5):
        with faulty_proxy(s3_server.endpoint_url, slow_down=1.0, reset=0.0) as proxy:
            cfg = dataclasses.replace(
                s3_server.storage, endpoint_url=proxy.endpoint, max_attempts=max_attempts
            )
            fs, path = storage.resolve(uri, cfg)
            in_task = pickle.loads(pickle.dumps(fs))
            with pytest.raises(OSError, match="SLOW_DOWN|503|reduce your request rate"):
                in_task.open_input_file(path).read()
        attempts.append(proxy.counts.slow_down)
    assert attempts == [2, 5]

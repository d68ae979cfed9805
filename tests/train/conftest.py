"""Training-data fixtures: real ESC-50 clips written as several clip shards per split, so
that block order, worker splits and retries of individual files all come into play."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pytest

from gpa_ray import storage
from gpa_ray.config import StorageConfig
from gpa_ray.testing.data import esc50_clip_table

CLIPS_PER_SHARD = 3
SPLITS = {"train": 12, "val": 6}
"""Clips per split (the first ESC-50 clips go to train, the next ones to val)."""

ShardWriter = Callable[[str, StorageConfig | None], str]


@pytest.fixture(scope="session")
def esc50_shard_table(shared_data: Path) -> pa.Table:
    """18 real ESC-50 clips (1 s, FLAC at 32 kHz, one templated caption each)."""
    return esc50_clip_table(shared_data / "esc50", sum(SPLITS.values()), max_seconds=1.0)


@pytest.fixture(scope="session")
def write_esc50_shards(esc50_shard_table: pa.Table) -> ShardWriter:
    """`write(data_uri, storage_cfg)`: the clips in the ingest layout under `data_uri`
    (`clips/esc50/<split>/part-N.parquet`, `CLIPS_PER_SHARD` clips each; local or s3://).
    Returns `data_uri`."""

    def write(data: str, storage_cfg: StorageConfig | None = None) -> str:
        start = 0
        for split, n in SPLITS.items():
            rows = esc50_shard_table.slice(start, n)
            start += n
            for part, offset in enumerate(range(0, n, CLIPS_PER_SHARD)):
                uri = storage.join(data, "clips", "esc50", split, f"part-{part:06d}.parquet")
                storage.write_parquet(uri, rows.slice(offset, CLIPS_PER_SHARD), storage_cfg)
        return data

    return write

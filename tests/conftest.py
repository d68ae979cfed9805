"""Session fixtures: one shared local Ray, one local S3 server, the real test audio."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pytest
import torch

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.config import ActorPoolConfig
from gpa_ray.models.factory import load_gpa
from gpa_ray.models.gpa import Embeddings
from gpa_ray.ray_embedding import embed_captions, embed_clips, read_captions
from gpa_ray.testing.data import (
    ESC50_POOL_TEST,
    ESC50_POOL_TRAIN,
    SHARED_DATA_ENV,
    shared_data_dir,
    write_esc50_clip_shards,
)
from gpa_ray.testing.services import S3Server, local_s3_server, start_local_ray

if TYPE_CHECKING:
    from ray.data import MaterializedDataset


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real audio folder; on CI a missing folder fails instead of skipping."""
    path = shared_data_dir()
    if not (path / "esc50").is_dir():
        message = f"real test data not found at {path} (set {SHARED_DATA_ENV})"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    """One embedded local Ray (2 CPUs, loopback, no dashboard) for the whole session."""
    import ray

    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A real S3 HTTP endpoint (moto server) on 127.0.0.1 with a test bucket."""
    with local_s3_server() as server:
        yield server


@pytest.fixture(scope="session")
def esc50_pool(shared_data: Path, s3_server: S3Server) -> str:
    """Ingest-layout shards of 12 train + 4 test real ESC-50 clips on the S3 server."""
    uri = s3_server.uri("bias-eval", "esc50-ingest")
    write_esc50_clip_shards(
        uri,
        shared_data / "esc50",
        ESC50_POOL_TRAIN,
        ESC50_POOL_TEST,
        storage_cfg=s3_server.storage,
    )
    return uri


@pytest.fixture(scope="session")
def lass_checkpoint(tmp_path_factory: pytest.TempPathFactory, s3_server: S3Server) -> str:
    """A tiny GPA (LASS scorer) saved with `save_gpa` on the S3 server."""
    # Deferred: torch + transformers take seconds, and torch-free sessions never get here.
    from gpa_ray.testing.models import (
        save_tiny_text_model,
        tiny_gpa_checkpoint,
        tiny_gpa_run_config,
    )

    uri = s3_server.uri("bias-eval", "checkpoint-lass")
    if not storage.exists(storage.join(uri, "model.pt"), s3_server.storage):
        text_dir = tmp_path_factory.getbasetemp() / "tiny-text-model"
        if not (text_dir / "config.json").exists():
            save_tiny_text_model(text_dir)
        cfg = tiny_gpa_run_config(str(text_dir), storage=s3_server.storage)
        tiny_gpa_checkpoint(uri, cfg, s3_server.storage)
    return uri


@pytest.fixture(scope="session")
def in_process_pool(
    esc50_pool: str, lass_checkpoint: str, s3_server: S3Server
) -> tuple[list[str], Embeddings, Embeddings]:
    """(train clip ids, their embeddings, the test captions' embeddings) of `esc50_pool`
    without Ray: parquet rows -> AudioInputs -> the model, the reference for Ray paths."""
    model, cfg = load_gpa(lass_checkpoint, s3_server.storage)
    inputs = AudioInputs.from_config(cfg)
    clips = storage.join(esc50_pool, "clips", "esc50", "train")
    rows = storage.read_parquet(clips, s3_server.storage).select(["clip_id", "audio"]).to_pylist()
    captions = read_captions(esc50_pool, "test", storage_cfg=s3_server.storage)
    with torch.inference_mode():
        queries = model.embed_audio(inputs.collate([inputs.from_row(r) for r in rows]))
        texts = model.embed_text(captions.column("caption").to_pylist())
    return [r["clip_id"] for r in rows], queries, texts


@pytest.fixture(scope="session")
def embedded_pool(
    ray_session: None, esc50_pool: str, lass_checkpoint: str, s3_server: S3Server
) -> tuple[MaterializedDataset, Embeddings, pa.Table]:
    """(train clip embeddings as a materialised Ray Dataset, test caption embeddings, the
    captions) of `esc50_pool`, embedded on Ray Data actor pools."""
    pool = ActorPoolConfig(actors=1, cpus_per_actor=0.5, batch_size=5)
    captions = read_captions(esc50_pool, "test", storage_cfg=s3_server.storage)
    texts = embed_captions(lass_checkpoint, captions, pool=pool, storage_cfg=s3_server.storage)
    queries = embed_clips(
        lass_checkpoint, esc50_pool, "train", pool=pool, storage_cfg=s3_server.storage
    )
    return queries, texts, captions

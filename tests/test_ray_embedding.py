"""Clips and captions embedded on Ray Data actor pools equal the same model run in process."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pyarrow as pa
import pytest
import torch

from gpa_ray.config import ActorPoolConfig
from gpa_ray.data.loaders import LoaderError
from gpa_ray.models.gpa import Embeddings
from gpa_ray.ray_embedding import (
    EmbeddingError,
    check_cpu_pool,
    fetch_embeddings,
    fetch_embeddings_in_order,
    read_captions,
)
from gpa_ray.testing.data import ESC50_POOL_TEST, ESC50_POOL_TRAIN
from gpa_ray.testing.services import S3Server

if TYPE_CHECKING:
    from ray.data import MaterializedDataset

TOL = 1e-5
"""Ray Data and the in-process loop batch differently: float rounding, nothing more."""


def test_a_gpu_pool_is_refused_by_name() -> None:
    check_cpu_pool(ActorPoolConfig(), "eval.embed_pool")
    with pytest.raises(ValueError, match="eval.embed_pool.gpus_per_actor=1.0"):
        check_cpu_pool(ActorPoolConfig(gpus_per_actor=1.0), "eval.embed_pool")


def test_captions_are_read_clip_major(esc50_pool: str, s3_server: S3Server) -> None:
    captions = read_captions(esc50_pool, "test", storage_cfg=s3_server.storage).to_pylist()
    # Two ESC-50 templates per test clip, in clip order, ids `<clip_id>#<caption index>`.
    assert len(captions) == 2 * ESC50_POOL_TEST
    first, second = captions[0], captions[1]
    assert first["clip_id"] == second["clip_id"]
    assert (first["text_id"], second["text_id"]) == (
        f"{first['clip_id']}#0",
        f"{first['clip_id']}#1",
    )
    assert first["caption"].startswith("the sound of a ")
    with pytest.raises(LoaderError, match="run ingest first"):
        read_captions(esc50_pool, "val", storage_cfg=s3_server.storage)


def test_ray_data_embeddings_equal_in_process(
    embedded_pool: tuple[MaterializedDataset, Embeddings, pa.Table],
    in_process_pool: tuple[list[str], Embeddings, Embeddings],
) -> None:
    queries_ds, texts, _ = embedded_pool
    ids, queries = fetch_embeddings(queries_ds, "clip_id")
    ref_ids, ref_queries, ref_texts = in_process_pool
    order = torch.tensor([ids.index(i) for i in ref_ids])
    assert sorted(ids) == sorted(ref_ids) and len(ids) == ESC50_POOL_TRAIN
    assert torch.allclose(queries.global_[order], ref_queries.global_, atol=TOL)
    assert torch.allclose(queries.prototypes[order], ref_queries.prototypes, atol=TOL)
    assert torch.allclose(texts.global_, ref_texts.global_, atol=TOL)
    assert torch.allclose(texts.prototypes, ref_texts.prototypes, atol=TOL)
    reordered = fetch_embeddings_in_order(queries_ds, "clip_id", ref_ids)
    assert torch.allclose(reordered.global_, ref_queries.global_, atol=TOL)
    with pytest.raises(EmbeddingError, match="missing e.g. \\['nope'\\]"):
        fetch_embeddings_in_order(queries_ds, "clip_id", [*ref_ids[1:], "nope"])

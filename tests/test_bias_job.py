"""The distributed Sinkhorn bias job: its pieces without Ray, then parity on the shared
local Ray against the single-process math, on real ESC-50 clips and a tiny GPA checkpoint
stored on the local S3 server."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Any

import pyarrow as pa
import pytest
import torch
import yaml

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.bias_job import (
    BIAS_FILE,
    CONFIG_FILE,
    META_FILE,
    BiasJobError,
    EmbedSettings,
    actor_count,
    align_to_texts,
    distributed_sinkhorn,
    embed_captions,
    embed_clips,
    embedding_table,
    embeddings_from_table,
    gather_embeddings,
    iter_row_blocks,
    read_bias,
    read_captions,
    run_bias_job,
)
from gpa_ray.config import Config, SinkhornConfig
from gpa_ray.data.loaders import LoaderError
from gpa_ray.models.gpa import Embeddings
from gpa_ray.models.gpa_checkpoint import load_gpa
from gpa_ray.sinkhorn import (
    combine_qb_norm_statistics,
    qb_norm,
    qb_norm_apply,
    qb_norm_statistics,
    sinkhorn_potentials,
)
from gpa_ray.testing.data import ESC50_POOL_TEST, ESC50_POOL_TRAIN
from gpa_ray.testing.jobs import job_main
from gpa_ray.testing.models import tiny_gpa_model
from gpa_ray.testing.services import S3Server
from gpa_ray.testing.synthetic import random_unit_embeddings

N_TRAIN, N_TEST = ESC50_POOL_TRAIN, ESC50_POOL_TEST
TOL = 1e-5


# ---------------------------------------------------------------- without Ray


def test_qb_norm_statistics_combine_over_row_blocks() -> None:
    gen = torch.Generator().manual_seed(3)
    bank = torch.randn(30, 7, generator=gen, dtype=torch.float64)
    test = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    full = qb_norm_statistics(bank, beta=20.0, k=2)
    parts = combine_qb_norm_statistics(
        [qb_norm_statistics(bank[a:b], 20.0, 2) for a, b in ((0, 11), (11, 12), (12, 30))]
    )
    assert torch.allclose(parts.lse, full.lse, atol=1e-12)
    assert torch.equal(parts.active, full.active)
    assert torch.equal(qb_norm_apply(test, full, 20.0), qb_norm(test, bank, 20.0, 2))


def test_qb_norm_statistics_by_hand() -> None:
    # Rows [0.9, 0.1, 0.0] and [0.8, 0.2, 0.1], beta = 1: LSE per column is
    # log(e^0.9 + e^0.8) = 1.5443966601, log(e^0.1 + e^0.2) = 0.8443966601,
    # log(e^0 + e^0.1) = 0.7443966601; top-1 of both rows is item 0, so only item 0 is active.
    bank = torch.tensor([[0.9, 0.1, 0.0], [0.8, 0.2, 0.1]], dtype=torch.float64)
    stats = qb_norm_statistics(bank, beta=1.0, k=1)
    assert stats.lse.tolist() == pytest.approx([1.5443966601, 0.8443966601, 0.7443966601])
    assert stats.active.tolist() == [True, False, False]


def test_embedding_table_round_trip() -> None:
    emb = random_unit_embeddings(5)
    ids, back = embeddings_from_table(embedding_table(list("abcde"), "clip_id", emb), "clip_id")
    assert ids == list("abcde")
    assert torch.equal(back.global_, emb.global_)
    assert torch.equal(back.prototypes, emb.prototypes)
    ids, dp = embeddings_from_table(
        embedding_table(["x"], "text_id", Embeddings(emb.global_[:1])), "text_id"
    )
    assert ids == ["x"] and dp.prototypes is None and torch.equal(dp.global_, emb.global_[:1])


def test_embeddings_from_chunked_and_sliced_tables() -> None:
    """What a bias actor gets: several object-store blocks, possibly slices of blocks."""
    emb = random_unit_embeddings(7)
    first = embedding_table(list("abcd"), "clip_id", emb[:4])
    second = embedding_table(list("efg"), "clip_id", emb[4:])
    table = pa.concat_tables([first.slice(1), second.slice(0, 2)])
    assert table.column("global").num_chunks == 2
    ids, back = embeddings_from_table(table, "clip_id")
    assert ids == list("bcdef")
    assert torch.equal(back.global_, emb.global_[1:6])
    assert torch.equal(back.prototypes, emb.prototypes[1:6])
    back.global_.add_(1.0)  # owned, writable memory, not the Arrow buffers
    assert torch.equal(embeddings_from_table(table, "clip_id")[1].global_, emb.global_[1:6])


def test_row_blocks_tile_the_score_matrix() -> None:
    model = tiny_gpa_model().eval()
    queries, texts = random_unit_embeddings(11, seed=1), random_unit_embeddings(9, seed=2)
    with torch.inference_mode():
        blocks = list(iter_row_blocks(model, queries, texts, block_size=4, text_block_size=2))
        full = model.score(queries, texts)
    assert [tuple(b.shape) for b in blocks] == [(4, 9), (4, 9), (3, 9)]
    assert torch.allclose(torch.cat(blocks), full, atol=1e-6)


def test_align_to_texts_names_missing_ids() -> None:
    import pyarrow as pa

    table = pa.table({"text_id": ["a#0", "b#0"], "bias": [0.5, -0.5]})
    assert align_to_texts(table, "bias", ["b#0", "a#0"]).tolist() == [-0.5, 0.5]
    with pytest.raises(BiasJobError, match="not 1 of the 2"):
        align_to_texts(table, "bias", ["a#0", "c#0"])


def test_actor_count_fixes_rows_per_actor_when_asked() -> None:
    assert actor_count(10, SinkhornConfig(num_actors=4)) == 4
    assert actor_count(3, SinkhornConfig(num_actors=4)) == 3  # never an actor without rows
    # ceil(G / rows_per_actor) actors, whatever num_actors says.
    assert actor_count(49_274, SinkhornConfig(num_actors=2, rows_per_actor=12_319)) == 4
    assert actor_count(12_319, SinkhornConfig(rows_per_actor=12_319)) == 1
    with pytest.raises(BiasJobError, match="rows_per_actor"):
        actor_count(10, SinkhornConfig(rows_per_actor=-1))
    with pytest.raises(BiasJobError, match="num_actors"):
        actor_count(10, SinkhornConfig(num_actors=0))


def test_job_needs_a_checkpoint() -> None:
    with pytest.raises(BiasJobError, match="sinkhorn.checkpoint"):
        run_bias_job(Config())


# ---------------------------------------------------------------- real clips, real Ray


def _in_process_embeddings(
    lass_checkpoint: str, esc50_pool: str, s3: S3Server
) -> tuple[list[str], Embeddings, Embeddings]:
    """Query and text embeddings without Ray: parquet rows -> AudioInputs -> the model."""
    model, cfg = load_gpa(lass_checkpoint, s3.storage)
    inputs = AudioInputs.from_config(cfg)
    rows = storage.read_parquet(storage.join(esc50_pool, "clips", "esc50", "train"), s3.storage)
    rows = rows.select(["clip_id", "audio"]).to_pylist()
    captions = read_captions(esc50_pool, "test", storage_cfg=s3.storage)
    with torch.inference_mode():
        queries = model.embed_audio(inputs.collate([inputs.from_row(r) for r in rows]))
        texts = model.embed_text(captions.column("caption").to_pylist())
    return [r["clip_id"] for r in rows], queries, texts


@pytest.fixture(scope="module")
def embedded(ray_session: None, esc50_pool: str, lass_checkpoint: str, s3_server: S3Server) -> Any:
    """Query embeddings (a materialised Ray Dataset) and text embeddings, via Ray Data."""
    settings = EmbedSettings(actors=1, cpus=0.5, batch_size=5)
    captions = read_captions(esc50_pool, "test", storage_cfg=s3_server.storage)
    texts = embed_captions(
        lass_checkpoint, captions, settings=settings, storage_cfg=s3_server.storage
    )
    queries = embed_clips(
        lass_checkpoint, esc50_pool, "train", settings=settings, storage_cfg=s3_server.storage
    )
    return queries, texts, captions


def test_captions_are_read_clip_major(esc50_pool: str, s3_server: S3Server) -> None:
    captions = read_captions(esc50_pool, "test", storage_cfg=s3_server.storage).to_pylist()
    # Two ESC-50 templates per test clip, in clip order, ids `<clip_id>#<caption index>`.
    assert len(captions) == 2 * N_TEST
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
    embedded: Any, esc50_pool: str, lass_checkpoint: str, s3_server: S3Server
) -> None:
    queries_ds, texts, _ = embedded
    ids, queries = gather_embeddings(queries_ds, "clip_id")
    ref_ids, ref_queries, ref_texts = _in_process_embeddings(lass_checkpoint, esc50_pool, s3_server)
    order = torch.tensor([ids.index(i) for i in ref_ids])
    assert sorted(ids) == sorted(ref_ids) and len(ids) == N_TRAIN
    assert torch.allclose(queries.global_[order], ref_queries.global_, atol=TOL)
    assert torch.allclose(queries.prototypes[order], ref_queries.prototypes, atol=TOL)
    assert torch.allclose(texts.global_, ref_texts.global_, atol=TOL)
    assert torch.allclose(texts.prototypes, ref_texts.prototypes, atol=TOL)


@pytest.mark.parametrize(
    ("num_actors", "block_size", "memory_budget_mb"),
    [
        pytest.param(1, 5, 256, id="1-actor-cached"),
        pytest.param(2, 2, 0, id="2-actors-recompute"),
        # Room for one [2, J] row block of the 2 x 4 x J bytes per actor.
        pytest.param(2, 2, 2 * 2 * N_TEST * 4 * 1.5 / 2**20, id="2-actors-partly-cached"),
        pytest.param(4, 3, 0, id="4-actors-recompute", marks=pytest.mark.slow),
    ],
)
def test_distributed_equals_single_process(
    embedded: Any,
    lass_checkpoint: str,
    s3_server: S3Server,
    num_actors: int,
    block_size: int,
    memory_budget_mb: float,
) -> None:
    queries_ds, texts, _ = embedded
    cfg = SinkhornConfig(
        num_actors=num_actors,
        cpus_per_actor=0.25,
        block_size=block_size,
        text_block_size=3,
        memory_budget_mb=memory_budget_mb,
        qb_norm_k=2,
    )
    result = distributed_sinkhorn(lass_checkpoint, queries_ds, texts, cfg, s3_server.storage)

    # Reference: the whole R' in one process and the plain single-process Sinkhorn.
    ids, queries = gather_embeddings(queries_ds, "clip_id")
    model, _ = load_gpa(lass_checkpoint, s3_server.storage)
    with torch.inference_mode():
        scores = model.score(queries, texts)
    f, g = sinkhorn_potentials(scores, cfg.epsilon, cfg.n_iter)
    assert torch.allclose(result.g, g, atol=TOL)
    f_by_id = dict(zip(ids, f.tolist(), strict=True))
    assert result.f.tolist() == pytest.approx([f_by_id[i] for i in result.query_ids], abs=TOL)
    qb = qb_norm_statistics(scores, cfg.qb_norm_beta, cfg.qb_norm_k)
    assert torch.allclose(result.qb_norm.lse, qb.lse, atol=1e-4)
    assert torch.equal(result.qb_norm.active, qb.active)

    # Every actor owns a share of the rows; nobody held R' whole unless it is one actor.
    n_texts = len(texts)
    assert len(result.actors) == num_actors
    assert sum(a["rows"] for a in result.actors) == N_TRAIN
    assert len(result.rounds) == cfg.n_iter
    # Each actor cached the leading row blocks that fit the budget and recomputed the rest
    # every round; no block held more than block_size rows of R'.
    block_bytes = block_size * n_texts * 4
    blocks_in_budget = int(memory_budget_mb * 2**20) // block_bytes
    for actor in result.actors:
        cached_rows = min(actor["rows"], blocks_in_budget * block_size)
        assert actor["cached_rows"] == cached_rows
        assert actor["score_passes"] == (1 if cached_rows == actor["rows"] else cfg.n_iter)
        assert actor["largest_block_elements"] <= block_size * n_texts


@pytest.mark.slow
@pytest.mark.s3
def test_job_end_to_end_on_s3(
    ray_session: None,
    esc50_pool: str,
    lass_checkpoint: str,
    s3_server: S3Server,
    caplog: pytest.LogCaptureFixture,
) -> None:
    output = s3_server.uri("bias-eval", "bias-job")
    s3 = s3_server.storage
    argv = [
        "--config",
        "debug",
        *s3_server.overrides(),
        f"sinkhorn.checkpoint={lass_checkpoint}",
        f"sinkhorn.queries={esc50_pool}",
        f"sinkhorn.output={output}",
        "sinkhorn.num_actors=2",
        "sinkhorn.cpus_per_actor=0.25",
        "sinkhorn.block_size=4",
        "sinkhorn.memory_budget_mb=0",
    ]
    with caplog.at_level(logging.INFO, logger="gpa_ray.bias_job"):
        assert job_main("sinkhorn_bias")(argv) == 0

    table, meta = read_bias(output, s3)
    ids, queries, texts = _in_process_embeddings(lass_checkpoint, esc50_pool, s3_server)
    model, _ = load_gpa(lass_checkpoint, s3)
    with torch.inference_mode():
        _, g = sinkhorn_potentials(model.score(queries, texts), 0.05, 10)
    captions = read_captions(esc50_pool, "test", storage_cfg=s3)
    assert table.column("text_id").to_pylist() == captions.column("text_id").to_pylist()
    assert table.column("bias").to_pylist() == pytest.approx(g.tolist(), abs=TOL)
    assert (meta["G"], meta["J"], meta["epsilon"], meta["n_iter"]) == (
        N_TRAIN,
        2 * N_TEST,
        0.05,
        10,
    )
    assert meta["checkpoint"] == lass_checkpoint and meta["num_actors"] == 2
    assert datetime.fromisoformat(meta["timestamp"]).tzinfo is not None
    assert [r["round"] for r in meta["rounds"]] == list(range(1, 11))
    assert all(
        a["cached_rows"] == 0 and a["largest_block_elements"] <= 4 * 2 * N_TEST
        for a in meta["actors"]
    )
    resolved = yaml.safe_load(storage.read_bytes(storage.join(output, CONFIG_FILE), s3))
    assert resolved["sinkhorn"]["output"] == output
    assert json.loads(storage.read_bytes(storage.join(output, META_FILE), s3)) == meta
    assert storage.exists(storage.join(output, BIAS_FILE), s3)
    progress = [r.getMessage() for r in caplog.records if "sinkhorn round" in r.getMessage()]
    assert len(progress) == 10 and progress[-1].startswith("sinkhorn round 10/10")

"""The distributed Sinkhorn bias job: its pieces without Ray, then parity on the shared
local Ray against the single-process math, on real ESC-50 clips and a tiny GPA checkpoint
stored on the local S3 server."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import TYPE_CHECKING

import pyarrow as pa
import pytest
import torch
import yaml

from gpa_ray import storage
from gpa_ray.bias_file import BIAS_FILE, META_FILE, read_bias
from gpa_ray.bias_job import (
    BiasJobError,
    actor_count,
    distributed_sinkhorn,
    iter_row_blocks,
    run_bias_job,
)
from gpa_ray.config import Config, SinkhornConfig
from gpa_ray.models.factory import load_gpa
from gpa_ray.models.gpa import Embeddings
from gpa_ray.ray_embedding import fetch_embeddings, read_captions
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

if TYPE_CHECKING:
    from ray.data import MaterializedDataset

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


def test_row_blocks_tile_the_score_matrix() -> None:
    model = tiny_gpa_model().eval()
    queries, texts = (
        random_unit_embeddings(11, seed=1),
        random_unit_embeddings(9, seed=2),
    )
    with torch.inference_mode():
        blocks = list(iter_row_blocks(model, queries, texts, block_size=4, text_block_size=2))
        full = model.score(queries, texts)
    assert [tuple(b.shape) for b in blocks] == [(4, 9), (4, 9), (3, 9)]
    assert torch.allclose(torch.cat(blocks), full, atol=1e-6)


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
    embedded_pool: tuple[MaterializedDataset, Embeddings, pa.Table],
    lass_checkpoint: str,
    s3_server: S3Server,
    num_actors: int,
    block_size: int,
    memory_budget_mb: float,
) -> None:
    queries_ds, texts, _ = embedded_pool
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
    ids, queries = fetch_embeddings(queries_ds, "clip_id")
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
    in_process_pool: tuple[list[str], Embeddings, Embeddings],
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
    model, _ = load_gpa(lass_checkpoint, s3)
    with torch.inference_mode():
        scores = model.score(*in_process_pool[1:])
    _, g = sinkhorn_potentials(scores, 0.05, 10)
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
    resolved = yaml.safe_load(storage.read_bytes(storage.join(output, storage.CONFIG_FILE), s3))
    assert resolved["sinkhorn"]["output"] == output
    assert json.loads(storage.read_bytes(storage.join(output, META_FILE), s3)) == meta
    assert storage.exists(storage.join(output, BIAS_FILE), s3)
    progress = [r.getMessage() for r in caplog.records if "sinkhorn round" in r.getMessage()]
    assert len(progress) == 10 and progress[-1].startswith("sinkhorn round 10/10")

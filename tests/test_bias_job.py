"""The distributed Sinkhorn bias job: its pieces without Ray, then parity on the shared
local Ray against the single-process math, on real ESC-50 clips and a tiny GPA checkpoint
stored on the local S3 server; then faults: a killed actor, a killed driver, a faulty S3."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import pyarrow as pa
import pytest
import torch
import yaml

from gpa_ray import storage
from gpa_ray.bias_file import BIAS_FILE, META_FILE, read_bias
from gpa_ray.bias_job import (
    BiasJobError,
    RoundObserver,
    actor_count,
    distributed_sinkhorn,
    run_bias_job,
)
from gpa_ray.bias_progress import RoundLog, StoredEmbeddings, StoredStateError
from gpa_ray.bias_shard import StoredRows, actor_memory_bytes, iter_row_blocks
from gpa_ray.config import Config, SinkhornConfig
from gpa_ray.embedding_table import embedding_table
from gpa_ray.models.factory import load_gpa
from gpa_ray.models.gpa import Embeddings
from gpa_ray.ray_embedding import fetch_embeddings, read_captions
from gpa_ray.sinkhorn import (
    QBNormStats,
    combine_qb_norm_statistics,
    qb_norm,
    qb_norm_apply,
    qb_norm_statistics,
    sinkhorn_potentials,
)
from gpa_ray.testing.data import ESC50_POOL_TEST, ESC50_POOL_TRAIN
from gpa_ray.testing.faulty_proxy import faulty_proxy
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
        blocks = list(
            iter_row_blocks(model.scorer, queries, texts, block_size=4, text_block_size=2)
        )
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


def test_actor_memory_request_is_its_share() -> None:
    cfg = SinkhornConfig(
        actor_overhead_mb=100, memory_budget_mb=1, block_size=8, text_block_size=16
    )
    # 10 rows, J = 1000, P = 4 prototypes of width E = 32, float32:
    # queries 10 * 5 * 32 * 4 = 6,400; cache min(1 MiB, 10 * 1000 * 4 = 40,000) = 40,000;
    # working 3 * 8 * 1000 * 4 = 96,000; tile 16 * 8 * 16 * 16 * 4 = 131,072.
    expected = 100 * 2**20 + 6_400 + 40_000 + 96_000 + 131_072
    assert actor_memory_bytes(10, 1000, 4, 32, cfg) == expected
    # Twice the rows: twice the queries and the cache, the same overhead and working set.
    assert actor_memory_bytes(20, 1000, 4, 32, cfg) == expected + 6_400 + 40_000
    # The cache is capped by the budget: 1 MiB at 1,000 rows (4 MB of R' rows).
    big = actor_memory_bytes(1000, 1000, 4, 32, cfg)
    assert big == 100 * 2**20 + 1000 * 5 * 32 * 4 + 2**20 + 96_000 + 131_072


def test_stored_queries_split_into_contiguous_row_ranges() -> None:
    stored = StoredEmbeddings("r", "id", 3, (("a", 4), ("b", 1), ("c", 5)))
    parts = stored.parts(3)
    assert [p.rows for p in parts] == [3, 3, 4]
    assert [p.files for p in parts] == [
        (StoredRows("a", 0, 3),),
        (StoredRows("a", 3, 4), StoredRows("b", 0, 1), StoredRows("c", 0, 1)),
        (StoredRows("c", 1, 5),),
    ]


def test_round_log_resumes_after_the_last_round_written(tmp_path: Path) -> None:
    settings = {"embedding_id": "e1", "epsilon": 0.05, "qb_norm_beta": 20.0, "qb_norm_k": 1}
    log = RoundLog(str(tmp_path / "rounds"), settings)
    fresh = log.start(n_texts=3, last_round=9)
    assert (fresh.round, fresh.g.tolist(), fresh.qb, fresh.records) == (0, [0.0] * 3, None, [])
    qb = QBNormStats(torch.tensor([1.5, 2.5, 3.5]), torch.tensor([True, False, True]))
    for index in (1, 2, 3):
        record = {"round": index, "max_abs_change_g": 0.1 / index, "seconds": 1.0}
        log.save(index, torch.full((3,), -0.25 * index), qb if index == 1 else None, record)
    state = RoundLog(str(tmp_path / "rounds"), settings).start(3, last_round=9)
    assert state.round == 3 and state.g.tolist() == [-0.75] * 3
    assert state.qb is not None and state.qb.lse.tolist() == [1.5, 2.5, 3.5]
    assert state.qb.active.tolist() == [True, False, True]
    assert [r["round"] for r in state.records] == [1, 2, 3]
    # No later than asked: a run with n_iter = 3 recomputes round 3 from round 2's g.
    assert RoundLog(str(tmp_path / "rounds"), settings).start(3, last_round=2).round == 2
    other = {**settings, "epsilon": 0.1}
    with pytest.raises(StoredStateError, match="epsilon: stored 0.05, now 0.1"):
        RoundLog(str(tmp_path / "rounds"), other).start(3, last_round=9)


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


# ---------------------------------------------------------------- shared texts, faults


def _synthetic_queries(n: int, seed: int) -> MaterializedDataset:
    """n random query embeddings (the tiny GPA's widths) as a materialised Ray Dataset."""
    import ray

    emb = random_unit_embeddings(n, dim=16, n_prototypes=4, seed=seed)
    table = embedding_table([f"q{i:04d}" for i in range(n)], "clip_id", emb)
    return ray.data.from_arrow(table).materialize()


def test_actors_read_one_shared_copy_of_the_texts(
    ray_session: None, lass_checkpoint: str, s3_server: S3Server
) -> None:
    # 65,536 texts x 5 vectors x 16 floats: 20 MiB of text embeddings, 4 actors.
    texts = random_unit_embeddings(65_536, dim=16, n_prototypes=4, seed=11)
    texts_mb = (texts.global_.numel() + texts.prototypes.numel()) * 4 / 2**20
    cfg = SinkhornConfig(
        num_actors=4, cpus_per_actor=0.25, n_iter=2, block_size=4, text_block_size=8192
    )
    result = distributed_sinkhorn(
        lass_checkpoint, _synthetic_queries(32, seed=12), texts, cfg, s3_server.storage
    )
    assert len(result.actors) == 4
    for actor in result.actors:
        # Every page of the texts was read, yet none of it is in the actor's private
        # memory: the arrays are read-only views of the object store's shared memory.
        assert actor["texts_mb"] == pytest.approx(texts_mb, abs=0.1)
        assert actor["texts_read_only"]
        assert actor["texts_private_mb"] < 0.1 * texts_mb, actor
        assert actor["rss_shmem_mb"] >= 0.9 * texts_mb, actor
    # The measure sees a private copy when there is one: in a fresh process (whose
    # allocator has no freed pages to reuse), copying arrays of that size adds it to its
    # anonymous memory.
    control = (
        "import numpy as np; from gpa_ray.bias_shard import process_memory_mb as m; "
        f"a = np.ones({texts.prototypes.numel()}, np.float32); b = m()['anon']; "
        "c = a.copy(); print(m()['anon'] - b)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(
        [sys.executable, "-c", control], env=env, capture_output=True, text=True, check=True
    )
    assert float(done.stdout) >= 0.9 * texts.prototypes.numel() * 4 / 2**20


class _KillOneActor(RoundObserver):
    """Kills the second actor while round `at_round` is in flight: SIGKILL of its process
    (as when a spot node is reclaimed; the PID is asked for in round 1, queued behind that
    round's task) or `ray.kill` with a restart allowed."""

    def __init__(self, at_round: int, how: str) -> None:
        self.at_round, self.how, self.pid = at_round, how, 0

    def submitted(self, round_index: int, actors: list) -> None:
        import ray

        if round_index == 1 and self.how == "sigkill":
            self.pid = ray.get(actors[1].pid.remote())
        if round_index != self.at_round:
            return
        if self.how == "sigkill":
            os.kill(self.pid, signal.SIGKILL)
        else:
            ray.kill(actors[1], no_restart=False)


@pytest.mark.parametrize("how", ["sigkill", "ray-kill"])
def test_an_actor_killed_mid_run_gives_the_undisturbed_bias(
    embedded_pool: tuple[MaterializedDataset, Embeddings, pa.Table],
    lass_checkpoint: str,
    s3_server: S3Server,
    how: str,
) -> None:
    queries_ds, texts, _ = embedded_pool
    cfg = SinkhornConfig(num_actors=2, cpus_per_actor=0.25, block_size=2, text_block_size=3)
    clean = distributed_sinkhorn(lass_checkpoint, queries_ds, texts, cfg, s3_server.storage)
    killer = _KillOneActor(at_round=3, how=how)
    hit = distributed_sinkhorn(
        lass_checkpoint, queries_ds, texts, cfg, s3_server.storage, observer=killer
    )
    assert [a["restarted"] for a in hit.actors] == [False, True]
    assert hit.query_ids == clean.query_ids
    assert torch.allclose(hit.g, clean.g, atol=1e-6, rtol=0)
    assert torch.allclose(hit.f, clean.f, atol=1e-6, rtol=0)
    assert [r["round"] for r in hit.rounds] == list(range(1, cfg.n_iter + 1))


def _job_argv(esc50_pool: str, checkpoint: str, output: str, s3_server: S3Server) -> list[str]:
    return [
        "--config",
        "debug",
        *s3_server.overrides(),
        f"sinkhorn.checkpoint={checkpoint}",
        f"sinkhorn.queries={esc50_pool}",
        f"sinkhorn.output={output}",
        "sinkhorn.num_actors=2",
        "sinkhorn.cpus_per_actor=0.25",
        "sinkhorn.block_size=4",
        "sinkhorn.actor_overhead_mb=256",
    ]


@pytest.fixture(scope="module")
def undisturbed_job(
    ray_session: None, esc50_pool: str, lass_checkpoint: str, s3_server: S3Server
) -> list[float]:
    """The bias of one undisturbed run of the job (the reference of the fault tests)."""
    output = s3_server.uri("bias-eval", "bias-undisturbed")
    assert job_main("sinkhorn_bias")(_job_argv(esc50_pool, lass_checkpoint, output, s3_server)) == 0
    return read_bias(output, s3_server.storage)[0].column("bias").to_pylist()


DRIVER = """
import sys, time
from gpa_ray.bias_job import RoundObserver, run_bias_job
from gpa_ray.jobs_cli import init_ray, parse_job_args


class HangAfterRound3(RoundObserver):
    def saved(self, round_index):
        if round_index == 3:
            print("round 3 saved", flush=True)
            time.sleep(3600)


cfg = parse_job_args(sys.argv[1:], "bias job that stops after round 3")
init_ray(cfg)
run_bias_job(cfg, HangAfterRound3())
"""


@pytest.mark.slow
@pytest.mark.s3
def test_a_driver_killed_after_round_3_resumes_at_round_4(
    undisturbed_job: list[float],
    esc50_pool: str,
    lass_checkpoint: str,
    s3_server: S3Server,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    import ray

    output = s3_server.uri("bias-eval", "bias-driver-killed")
    argv = _job_argv(esc50_pool, lass_checkpoint, output, s3_server)
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    address = ray.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    driver = subprocess.Popen(
        [sys.executable, str(script), *argv, f"ray.address={address}"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        lines = []
        for line in driver.stdout:  # blocks until the driver prints or exits
            lines.append(line)
            if line.startswith("round 3 saved"):
                break
        assert driver.poll() is None, "".join(lines[-30:])
        rounds = storage.join(output, "rounds")
        assert storage.exists(storage.join(rounds, "round-0003.parquet"), s3_server.storage)
    finally:
        driver.kill()  # SIGKILL: no cleanup, as when a driver's node disappears
        driver.wait(timeout=60)
    assert not storage.exists(storage.join(rounds, "round-0004.parquet"), s3_server.storage)
    assert not storage.exists(storage.join(output, BIAS_FILE), s3_server.storage)

    with caplog.at_level(logging.INFO, logger="gpa_ray.bias_job"):
        assert job_main("sinkhorn_bias")(argv) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("resumed at round 4 ") for m in messages), messages
    assert any(m.startswith("reused the embeddings at ") for m in messages), messages
    assert not any(m.startswith("embedded ") for m in messages)
    progress = [m for m in messages if m.startswith("sinkhorn round")]
    assert progress[0].startswith("sinkhorn round 4/10") and len(progress) == 7
    table, meta = read_bias(output, s3_server.storage)
    assert meta["resumed_at_round"] == 4 and meta["embeddings_reused"] is True
    assert [r["round"] for r in meta["rounds"]] == list(range(1, 11))
    assert table.column("bias").to_pylist() == pytest.approx(undisturbed_job, abs=1e-6)


@pytest.mark.slow
@pytest.mark.s3
def test_job_through_a_faulty_proxy_equals_an_undisturbed_run(
    undisturbed_job: list[float], esc50_pool: str, lass_checkpoint: str, s3_server: S3Server
) -> None:
    output = s3_server.uri("bias-eval", "bias-faulty-proxy")
    argv = _job_argv(esc50_pool, lass_checkpoint, output, s3_server)
    with faulty_proxy(s3_server.endpoint_url, slow_down=0.1, reset=0.05, seed=4) as proxy:
        assert job_main("sinkhorn_bias")([*argv, f"storage.endpoint_url={proxy.endpoint}"]) == 0
    assert proxy.counts.total > 50 and proxy.counts.faulty_share >= 0.10, proxy.counts
    table, meta = read_bias(output, s3_server.storage)
    assert table.column("bias").to_pylist() == pytest.approx(undisturbed_job, abs=1e-6)
    assert meta["resumed_at_round"] == 1 and meta["embeddings_reused"] is False

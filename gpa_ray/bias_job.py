"""Sinkhorn text biases over the full test pool (GPA eq 10), distributed on Ray.

GPA scores G training audio clips (queries) against the J test captions, R' [G, J], and
turns the text potential g of an entropic transport with uniform marginals into an
additive A2T bias (`gpa_ray.sinkhorn` has the math). At AudioCaps size R' is 49k x 4.8k;
at WavCaps size it no longer fits one machine, so this job never builds it whole:

1. **Embeddings** (`gpa_ray.ray_embedding`), computed once and stored at the output
   (`gpa_ray.bias_progress`). The test captions are read on the driver (only `clip_id`
   and `captions`) and embedded on a Ray Data actor pool (`sinkhorn.embed_pool`); the
   training clips are embedded the same way and written block by block by Ray tasks,
   never passing through the driver. A rerun finds the manifest and reuses them.
2. **Shards of queries.** The queries are cut into contiguous row ranges, one per
   `QueryShard` actor (`gpa_ray.bias_shard`): `num_actors` of them, or
   ceil(G / `rows_per_actor`) so that an actor's share stays the same size however large
   G gets (`actor_count`). The text embeddings go into the object store once and every
   actor reads that one copy in place. Each actor asks Ray for the memory its share needs
   (`actor_memory_bytes`) and is restartable (`sinkhorn.actor_restarts`): a restarted
   actor reloads its rows and the round in flight is retried on it.
3. **Iterations.** Every round the driver broadcasts g (one `ray.put`); each actor
   computes f for its rows and its column log-sum-exp (a J-vector) from its R' rows; the
   driver combines the J-vectors (`combine_column_lse`), computes the new g
   (`column_potential`) and writes it to `<output>/rounds/` before the next round, so a
   rerun after any failure resumes at the next round. R' rows are scored with the fused
   LASS kernel (`gpa_ray.models.fused_lass`) and updated with one temporary per block
   (`gpa_ray.sinkhorn_fast`). The first round also reduces QB-Norm's querybank
   statistics (a J-vector LSE and a J-vector activation mask), so evaluation can compare
   against QB-Norm without R' either.
4. **Output** at `sinkhorn.output` (local or s3://), in the format of `gpa_ray.bias_file`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gpa_ray import storage
from gpa_ray.bias_file import bias_table, write_bias
from gpa_ray.bias_progress import (
    RoundLog,
    RoundState,
    StoredEmbeddings,
    StoredStateError,
    load_embeddings,
    round_settings,
    store_embeddings,
)
from gpa_ray.bias_shard import (
    QueryPart,
    QueryShard,
    ScorerWeights,
    actor_memory_bytes,
    share_texts,
)
from gpa_ray.checkpoints import read_config, read_weights
from gpa_ray.config import Config, SinkhornConfig, StorageConfig, resolve_stage_uris
from gpa_ray.embedding_inputs import embedding_inputs
from gpa_ray.models.gpa import Embeddings
from gpa_ray.ray_embedding import (
    embed_captions,
    embed_clips,
    read_captions,
    start_embedding_job,
)
from gpa_ray.sinkhorn import (
    QBNormStats,
    column_potential,
    combine_column_lse,
    combine_qb_norm_statistics,
)

if TYPE_CHECKING:
    from ray.data import MaterializedDataset

    QuerySource = MaterializedDataset | StoredEmbeddings
    """Where the queries are: a materialised embedding Dataset or the job's stored files."""

logger = logging.getLogger(__name__)


class BiasJobError(RuntimeError):
    """The bias job cannot run as configured."""


@dataclasses.dataclass(frozen=True)
class SinkhornResult:
    """Potentials of the distributed run: g [J] (the text bias), f [G] with the query clip
    ids in the same order, QB-Norm's querybank statistics, per-round and per-actor logs;
    `resumed_at` is the first round this run computed (1 unless it resumed);
    `startup_seconds` the actors' start (process, model, rows, texts) before round 1."""

    g: Tensor
    f: Tensor
    query_ids: list[str]
    qb_norm: QBNormStats
    rounds: list[dict[str, float]]
    actors: list[dict[str, Any]]
    resumed_at: int = 1
    startup_seconds: float = 0.0


class RoundObserver:
    """Hooks into the round loop (fault-injection tests, progress displays); no-ops here."""

    def submitted(self, round_index: int, actors: list[Any]) -> None:
        """Round `round_index`'s tasks are submitted to `actors` and not yet collected."""

    def saved(self, round_index: int) -> None:
        """The potentials after round `round_index` are written."""


def _row_ranges(n_rows: int, n_parts: int) -> list[int]:
    """Split points of `n_rows` into `n_parts` contiguous ranges of near-equal size."""
    return [n_rows * i // n_parts for i in range(1, n_parts)]


def actor_count(n_rows: int, cfg: SinkhornConfig) -> int:
    """How many `QueryShard` actors share G = `n_rows` queries: ceil(G / rows_per_actor)
    when that is set (fixed memory per actor), else `num_actors`; never more than G."""
    if cfg.rows_per_actor < 0:
        raise BiasJobError("sinkhorn.rows_per_actor must be >= 0 (0: use sinkhorn.num_actors)")
    if cfg.rows_per_actor > 0:
        return max(1, math.ceil(n_rows / cfg.rows_per_actor))
    if cfg.num_actors < 1:
        raise BiasJobError("sinkhorn.num_actors must be >= 1")
    return min(cfg.num_actors, n_rows)


def _query_parts(queries: QuerySource, n_rows: int, n_actors: int) -> list[QueryPart]:
    """Each actor's rows: blocks of a materialised dataset, or ranges of stored files."""
    if isinstance(queries, StoredEmbeddings):
        return queries.parts(n_actors)
    splits = queries.split_at_indices(_row_ranges(n_rows, n_actors)) if n_actors > 1 else [queries]
    return [QueryPart(rows=part.count(), blocks=tuple(part.to_arrow_refs())) for part in splits]


def read_scorer_weights(checkpoint: str, storage_cfg: StorageConfig) -> ScorerWeights:
    """The checkpoint's scorer, read once on the driver for every actor (a scorer without
    weights, like mean pooling, has no entries)."""
    gpa = read_config(checkpoint, storage_cfg).gpa
    state, _ = read_weights(checkpoint, storage_cfg)
    prefix = "scorer."
    scorer_state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    return ScorerWeights(gpa.scorer, gpa.n_prototypes + 1, scorer_state)


def _start_actors(
    weights: ScorerWeights,
    parts: list[QueryPart],
    texts: Embeddings,
    cfg: SinkhornConfig,
    storage_cfg: StorageConfig,
) -> tuple[list[Any], list[int], Any]:
    """One restartable `QueryShard` per part, each asking for the memory its share needs
    (`actor_memory_bytes`), all reading the one shared copy of the texts. Returns the
    actors, their memory requests and the texts' object ref, which the caller holds until
    the actors are done: a restarted actor fetches it again."""
    import ray

    n_rows = sum(part.rows for part in parts)
    texts_ref = share_texts(texts)
    n_protos = 0 if texts.prototypes is None else texts.prototypes.shape[1]
    dim = texts.global_.shape[1]
    actor_class = ray.remote(QueryShard)
    actors, requests = [], []
    for part in parts:
        memory = actor_memory_bytes(part.rows, len(texts), n_protos, dim, cfg)
        options = actor_class.options(
            num_cpus=cfg.cpus_per_actor,
            memory=memory,
            max_restarts=cfg.actor_restarts,
            max_task_retries=-1 if cfg.actor_restarts else 0,
        )
        actors.append(options.remote(weights, storage_cfg, part, [texts_ref], n_rows, cfg))
        requests.append(memory)
    return actors, requests, texts_ref


def _initial_state(cfg: SinkhornConfig, n_texts: int, rounds: RoundLog | None) -> RoundState:
    """Where the loop starts: after the last stored round, but no later than n_iter - 1,
    so the last round (and with it f) is always computed by this run."""
    if rounds is None:
        return RoundState(0, torch.zeros(n_texts), None, [])
    state = rounds.start(n_texts, cfg.n_iter - 1)
    if state.round:
        logger.info(
            "resumed at round %d from the potentials of round %d at %s",
            state.round + 1,
            state.round,
            rounds.root,
        )
    return state


def _round(
    actors: list[Any], g: Tensor, round_index: int, cfg: SinkhornConfig, observer: RoundObserver
) -> tuple[Tensor, QBNormStats | None]:
    """One round on every actor: the new g (and QB-Norm's statistics in round 1)."""
    import ray

    g_ref = ray.put(g)
    pending = [a.step.remote(g_ref, round_index == 1) for a in actors]
    observer.submitted(round_index, actors)
    outputs = ray.get(pending)
    new_g = column_potential(combine_column_lse([lse for lse, _ in outputs]), cfg.epsilon)
    qb = combine_qb_norm_statistics([stats for _, stats in outputs]) if round_index == 1 else None
    return new_g, qb


def distributed_sinkhorn(
    checkpoint: str,
    queries: QuerySource,
    texts: Embeddings,
    cfg: SinkhornConfig,
    storage_cfg: StorageConfig | None = None,
    *,
    rounds: RoundLog | None = None,
    observer: RoundObserver | None = None,
) -> SinkhornResult:
    """GPA eq 10 over R' = scores(queries, texts) with rows split over `actor_count`
    `QueryShard` actors; only J-vectors travel each round. `queries` is a materialised
    embedding Dataset (`embed_clips`) or the job's `StoredEmbeddings`, `texts` the text
    embeddings. With `rounds`, g is written after every round and the loop resumes after
    the last round stored there."""
    import ray

    if cfg.n_iter < 1:
        raise BiasJobError("sinkhorn.n_iter must be >= 1")
    n_rows = queries.n_queries if isinstance(queries, StoredEmbeddings) else queries.count()
    if n_rows == 0:
        raise BiasJobError("no training queries to compute the bias from")
    observer = observer or RoundObserver()
    state = _initial_state(cfg, len(texts), rounds)
    parts = _query_parts(queries, n_rows, actor_count(n_rows, cfg))
    storage_cfg = storage_cfg or StorageConfig()
    weights = read_scorer_weights(checkpoint, storage_cfg)
    actors, requests, texts_ref = _start_actors(weights, parts, texts, cfg, storage_cfg)
    g, qb, records = state.g, state.qb, list(state.records)
    started = time.perf_counter()
    try:
        ray.get([a.ready.remote() for a in actors])
        startup = time.perf_counter() - started
        for round_index in range(state.round + 1, cfg.n_iter + 1):
            start = time.perf_counter()
            new_g, round_qb = _round(actors, g, round_index, cfg, observer)
            qb = round_qb if round_index == 1 else qb
            change = float((new_g - g).abs().max())
            g = new_g
            record = {
                "round": round_index,
                "max_abs_change_g": change,
                "seconds": time.perf_counter() - start,
            }
            records.append(record)
            if rounds is not None:
                rounds.save(round_index, g, qb, record)
            observer.saved(round_index)
            logger.info(
                "sinkhorn round %d/%d: max|dg| = %.3e, %.2f s (G=%d, J=%d, %d actors)",
                round_index,
                cfg.n_iter,
                change,
                record["seconds"],
                n_rows,
                len(texts),
                len(actors),
            )
        potentials = ray.get([a.potentials.remote() for a in actors])
        actor_stats = ray.get([a.stats.remote() for a in actors])
    finally:
        for actor in actors:
            ray.kill(actor)
        del texts_ref  # held while any actor could restart and fetch it
    assert qb is not None
    for stats, request in zip(actor_stats, requests, strict=True):
        stats["memory_request_mb"] = round(request / 2**20, 1)
    query_ids = [clip for ids, _ in potentials for clip in ids]
    f = torch.cat([f_part for _, f_part in potentials])
    return SinkhornResult(g, f, query_ids, qb, records, actor_stats, state.round + 1, startup)


# ------------------------------------------------------------------ the job


def _metadata(
    cfg: Config, checkpoint: str, result: SinkhornResult, seconds: dict[str, float]
) -> dict[str, Any]:
    """`bias.json`: what was computed from what, how it converged, what it cost."""
    sk, bias = cfg.sinkhorn, result.g
    return {
        "G": len(result.query_ids),
        "J": len(bias),
        "epsilon": sk.epsilon,
        "n_iter": sk.n_iter,
        "checkpoint": checkpoint,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "queries": {"data": sk.queries, "split": sk.queries_split, "corpus": sk.corpus},
        "texts": {"data": sk.texts, "split": sk.texts_split, "corpus": sk.corpus},
        "qb_norm": {"beta": sk.qb_norm_beta, "k": sk.qb_norm_k},
        "num_actors": len(result.actors),
        "rows_per_actor": sk.rows_per_actor,
        "block_size": sk.block_size,
        "text_block_size": sk.text_block_size,
        "memory_budget_mb": sk.memory_budget_mb,
        "resumed_at_round": result.resumed_at,
        "actor_startup_seconds": round(result.startup_seconds, 3),
        "rounds": result.rounds,
        "actors": result.actors,
        "seconds": seconds,
        "bias": {
            "min": float(bias.min()),
            "max": float(bias.max()),
            "mean": float(bias.mean()),
            "std": float(bias.std()) if len(bias) > 1 else 0.0,
        },
    }


def _embedding_source(cfg: Config, checkpoint: str) -> dict[str, Any]:
    """What the stored embeddings were computed from (`gpa_ray.embedding_inputs`): a
    rerun must match it to reuse them."""
    sk = cfg.sinkhorn
    inputs = {
        "queries": (sk.queries, sk.queries_split, sk.corpus),
        "texts": (sk.texts, sk.texts_split, sk.corpus),
    }
    return embedding_inputs(checkpoint, inputs, sk.embed_pool.batch_size, cfg.storage)


def _embeddings(
    cfg: Config, checkpoint: str, text_ids: list[str]
) -> tuple[StoredEmbeddings, Embeddings, bool]:
    """The stored embeddings and the text embeddings: reused from a previous run at the
    output when it stored them for the same inputs, else computed and stored now.
    Returns (stored, texts, reused)."""
    sk = cfg.sinkhorn
    source = _embedding_source(cfg, checkpoint)
    stored = load_embeddings(sk.output, source, cfg.storage)
    if stored is not None:
        stored_ids, texts = stored.read_texts(cfg.storage)
        if stored_ids != text_ids:
            raise StoredStateError(
                f"{stored.texts_file} holds other captions than {sk.texts} (split "
                f"{sk.texts_split!r}) has now; use another sinkhorn.output or delete it"
            )
        logger.info(
            "reused the embeddings at %s (G=%d, J=%d): not re-embedding",
            stored.root,
            stored.n_queries,
            stored.n_texts,
        )
        return stored, texts, True
    captions = read_captions(sk.texts, sk.texts_split, sk.corpus, cfg.storage)
    texts = embed_captions(checkpoint, captions, pool=sk.embed_pool, storage_cfg=cfg.storage)
    queries = embed_clips(
        checkpoint,
        sk.queries,
        sk.queries_split,
        corpus=sk.corpus,
        pool=sk.embed_pool,
        storage_cfg=cfg.storage,
    )
    stored = store_embeddings(sk.output, source, text_ids, texts, queries, cfg.storage)
    logger.info(
        "embedded %d captions and %d training clips; stored them at %s",
        len(texts),
        stored.n_queries,
        stored.root,
    )
    return stored, texts, False


def run_bias_job(cfg: Config, observer: RoundObserver | None = None) -> dict[str, Any]:
    """Compute and write the text bias the config describes; return the job's summary.
    Rerun with the same config after a failure, it resumes (see the module docstring)."""
    cfg = resolve_stage_uris(cfg)
    sk = cfg.sinkhorn
    if not sk.checkpoint:
        raise BiasJobError("set sinkhorn.checkpoint to a GPA checkpoint (or run) URI")
    started = time.perf_counter()
    checkpoint = start_embedding_job(
        cfg, sk.checkpoint, sk.embed_pool, "sinkhorn.embed_pool", sk.output
    )
    captions = read_captions(sk.texts, sk.texts_split, sk.corpus, cfg.storage)
    text_ids = captions.column("text_id").to_pylist()
    stored, texts, reused = _embeddings(cfg, checkpoint, text_ids)
    embedded = time.perf_counter()
    rounds = RoundLog(
        storage.join(sk.output, "rounds"), round_settings(sk, stored.embedding_id), cfg.storage
    )
    result = distributed_sinkhorn(
        checkpoint, stored, texts, sk, cfg.storage, rounds=rounds, observer=observer
    )
    finished = time.perf_counter()

    if not bool(torch.isfinite(result.g).all()):
        raise BiasJobError("the text bias is not finite: check the checkpoint's scores")
    seconds = {"embed": round(embedded - started, 3), "sinkhorn": round(finished - embedded, 3)}
    metadata = _metadata(cfg, checkpoint, result, seconds)
    metadata["embeddings_reused"] = reused
    write_bias(sk.output, bias_table(captions, result.g, result.qb_norm), metadata, cfg.storage)
    logger.info("wrote the text bias of %d captions to %s", len(texts), sk.output)
    keys = ("G", "J", "epsilon", "n_iter", "checkpoint", "num_actors", "resumed_at_round")
    return {
        "output": sk.output,
        **{k: metadata[k] for k in keys},
        "embeddings_reused": reused,
        "seconds": round(time.perf_counter() - started, 3),
        "bias": metadata["bias"],
    }

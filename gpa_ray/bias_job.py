"""Sinkhorn text biases over the full test pool (GPA eq 10), distributed on Ray.

GPA scores G training audio clips (queries) against the J test captions, R' [G, J], and
turns the text potential g of an entropic transport with uniform marginals into an
additive A2T bias (`gpa_ray.sinkhorn` has the math). At AudioCaps size R' is 49k x 4.8k;
at WavCaps size it no longer fits one machine, so this job never builds it whole:

1. **Embeddings** (`gpa_ray.ray_embedding`). The test captions are read on the driver
   (only `clip_id` and `captions`) and embedded on a Ray Data actor pool
   (`sinkhorn.embed_pool`); the J text embeddings come back to the driver and are put in
   the object store once. The training clips are embedded the same way and materialised
   in the object store; they never pass through the driver.
2. **Shards of queries.** The query dataset is cut into row ranges whose Arrow blocks go
   to `QueryShard` actors: `num_actors` of them, or ceil(G / `rows_per_actor`) so that an
   actor's share stays the same size however large G gets (`actor_count`).
3. **Iterations.** Each `QueryShard` owns its rows of R'. Every round the driver
   broadcasts g (one `ray.put`); each actor computes f for its rows and its column
   log-sum-exp (a J-vector) from its R' rows; the driver combines the J-vectors
   (`combine_column_lse`) and computes the new g (`column_potential`). R' rows are scored
   in [block_size, text_block_size] tiles (`GPAModel.iter_score_tiles`) and assembled
   into [block_size, J] row blocks. In the first round an actor keeps as many leading row
   blocks as fit `sinkhorn.memory_budget_mb`; every later round reuses those and recomputes
   only the rest, holding at most one further row block. Per-actor memory is therefore
   bounded by the budget plus O(block x J) whatever G is, and the compute is one scoring
   pass when the budget holds the actor's rows (the usual case) and degrades gradually,
   not all at once, when it does not.
   The first round also reduces QB-Norm's querybank statistics (a J-vector LSE and a
   J-vector activation mask), so evaluation can compare against QB-Norm without R' either.
4. **Output** at `sinkhorn.output` (local or s3://), in the format of `gpa_ray.bias_file`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from torch import Tensor

from gpa_ray.bias_file import bias_table, write_bias
from gpa_ray.config import Config, SinkhornConfig, StorageConfig, resolve_stage_uris
from gpa_ray.embedding_table import embeddings_from_table
from gpa_ray.models.factory import load_gpa
from gpa_ray.models.gpa import Embeddings, GPAModel
from gpa_ray.ray_embedding import (
    embed_captions,
    embed_clips,
    read_captions,
    start_embedding_job,
    torch_threads,
)
from gpa_ray.sinkhorn import (
    QBNormStats,
    column_lse,
    column_potential,
    combine_column_lse,
    combine_qb_norm_statistics,
    qb_norm_statistics,
    row_potential,
)

if TYPE_CHECKING:
    import ray.data

logger = logging.getLogger(__name__)


class BiasJobError(RuntimeError):
    """The bias job cannot run as configured."""


# ------------------------------------------------------------------ Sinkhorn actors


def iter_row_blocks(
    model: GPAModel,
    queries: Embeddings,
    texts: Embeddings,
    block_size: int,
    text_block_size: int,
) -> Iterator[Tensor]:
    """R' in row blocks [<= block_size, J], each assembled from [block, text_block] tiles, so
    at most one row block (plus one tile's scorer intermediates) is alive at a time."""
    tiles: list[Tensor] = []
    current = 0
    for tile in model.iter_score_tiles(queries, texts, block_size, text_block_size):
        if tile.audio_start != current and tiles:
            yield torch.cat(tiles, dim=1)
            tiles = []
        current = tile.audio_start
        tiles.append(tile.scores)
    if tiles:
        yield torch.cat(tiles, dim=1)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class QueryShard:
    """One actor's slice of the training queries and its rows of R' (cached or recomputed).

    Created with the object refs of its Arrow tables of query embeddings (fetched here,
    not through the driver), the text embeddings and G, the number of queries over all
    actors.
    """

    def __init__(
        self,
        checkpoint: str,
        storage_cfg: StorageConfig,
        query_refs: list[ray.ObjectRef],
        texts: Embeddings,
        n_rows_total: int,
        cfg: SinkhornConfig,
    ) -> None:
        import ray

        torch.set_num_threads(torch_threads(cfg.cpus_per_actor))
        self.cfg = cfg
        self.n_rows_total = n_rows_total
        self.model, _ = load_gpa(checkpoint, storage_cfg, "cpu")
        table = pa.concat_tables(ray.get(list(query_refs)))
        self.query_ids = table.column("clip_id").to_pylist()
        self.queries = embeddings_from_table(table)
        self.texts = texts
        self.budget_bytes = int(cfg.memory_budget_mb * 1024 * 1024)
        self.largest_block = 0
        self.score_passes = 0
        self.score_seconds = 0.0
        # Leading row blocks of R' kept from the first round (a prefix of the rows).
        self._cached: list[Tensor] = []
        self._cached_rows = 0
        self.f = torch.zeros(len(self.queries))

    @property
    def cached_bytes(self) -> int:
        return sum(block.numel() * block.element_size() for block in self._cached)

    @torch.inference_mode()
    def _row_blocks(self) -> Iterator[Tensor]:
        """This actor's R' rows in order: the cached prefix, then the rest recomputed. Only
        the first pass adds to the cache, and only while the blocks fit the budget."""
        cfg = self.cfg
        yield from self._cached
        if self._cached_rows == len(self.queries):
            return
        caching = self.score_passes == 0
        start = time.perf_counter()
        rest = self.queries[self._cached_rows :]
        for block in iter_row_blocks(
            self.model, rest, self.texts, cfg.block_size, cfg.text_block_size
        ):
            self.score_seconds += time.perf_counter() - start
            self.largest_block = max(self.largest_block, block.numel())
            block_bytes = block.numel() * block.element_size()
            caching = caching and self.cached_bytes + block_bytes <= self.budget_bytes
            if caching:
                self._cached.append(block)
                self._cached_rows += len(block)
            yield block
            start = time.perf_counter()
        self.score_passes += 1

    @torch.inference_mode()
    def step(self, g: Tensor, with_qb_norm: bool = False) -> tuple[Tensor, QBNormStats | None]:
        """One round for these rows: f from g, and their column LSE [J] (and, if
        asked, QB-Norm's statistics of these querybank rows)."""
        cfg = self.cfg
        f_parts: list[Tensor] = []
        partials: list[Tensor] = []
        qb_parts: list[QBNormStats] = []
        for block in self._row_blocks():
            f_block = row_potential(block, g, cfg.epsilon, self.n_rows_total)
            f_parts.append(f_block)
            partials.append(column_lse(block, f_block, cfg.epsilon))
            if with_qb_norm:
                qb_parts.append(qb_norm_statistics(block, cfg.qb_norm_beta, cfg.qb_norm_k))
        self.f = torch.cat(f_parts)
        qb = combine_qb_norm_statistics(qb_parts) if with_qb_norm else None
        return combine_column_lse(partials), qb

    def potentials(self) -> tuple[list[str], Tensor]:
        """(query clip ids, f) of this shard after the last round."""
        return self.query_ids, self.f

    def stats(self) -> dict[str, Any]:
        return {
            "rows": len(self.queries),
            "cached_rows": self._cached_rows,
            "cached_mb": round(self.cached_bytes / 2**20, 1),
            "largest_block_elements": self.largest_block,
            "score_passes": self.score_passes,
            "score_seconds": round(self.score_seconds, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }


@dataclasses.dataclass(frozen=True)
class SinkhornResult:
    """Potentials of the distributed run: g [J] (the text bias), f [G] with the query clip
    ids in the same order, QB-Norm's querybank statistics, per-round and per-actor logs."""

    g: Tensor
    f: Tensor
    query_ids: list[str]
    qb_norm: QBNormStats
    rounds: list[dict[str, float]]
    actors: list[dict[str, Any]]


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


def distributed_sinkhorn(
    checkpoint: str,
    queries: ray.data.MaterializedDataset,
    texts: Embeddings,
    cfg: SinkhornConfig,
    storage_cfg: StorageConfig | None = None,
) -> SinkhornResult:
    """GPA eq 10 over R' = scores(queries, texts) with rows split over `actor_count`
    `QueryShard` actors; only J-vectors travel each round. `queries` is a materialised
    embedding Dataset (`embed_clips`), `texts` the text embeddings."""
    import ray

    if cfg.n_iter < 1:
        raise BiasJobError("sinkhorn.n_iter must be >= 1")
    n_rows = queries.count()
    if n_rows == 0:
        raise BiasJobError("no training queries to compute the bias from")
    n_actors = actor_count(n_rows, cfg)
    parts = queries.split_at_indices(_row_ranges(n_rows, n_actors)) if n_actors > 1 else [queries]
    storage_cfg = storage_cfg or StorageConfig()
    texts_ref = ray.put(texts)
    actor_class = ray.remote(QueryShard).options(num_cpus=cfg.cpus_per_actor)
    actors = [
        actor_class.remote(
            checkpoint, storage_cfg, list(part.to_arrow_refs()), texts_ref, n_rows, cfg
        )
        for part in parts
    ]
    try:
        g = torch.zeros(len(texts))
        qb: QBNormStats | None = None
        rounds: list[dict[str, float]] = []
        for round_index in range(1, cfg.n_iter + 1):
            start = time.perf_counter()
            g_ref = ray.put(g)
            outputs = ray.get([a.step.remote(g_ref, round_index == 1) for a in actors])
            new_g = column_potential(combine_column_lse([lse for lse, _ in outputs]), cfg.epsilon)
            if round_index == 1:
                qb = combine_qb_norm_statistics([stats for _, stats in outputs])
            change = float((new_g - g).abs().max())
            g = new_g
            seconds = time.perf_counter() - start
            rounds.append({"round": round_index, "max_abs_change_g": change, "seconds": seconds})
            logger.info(
                "sinkhorn round %d/%d: max|dg| = %.3e, %.2f s (G=%d, J=%d, %d actors)",
                round_index,
                cfg.n_iter,
                change,
                seconds,
                n_rows,
                len(texts),
                n_actors,
            )
        potentials = ray.get([a.potentials.remote() for a in actors])
        actor_stats = ray.get([a.stats.remote() for a in actors])
    finally:
        for actor in actors:
            ray.kill(actor)
    assert qb is not None
    query_ids = [clip for ids, _ in potentials for clip in ids]
    f = torch.cat([f_part for _, f_part in potentials])
    return SinkhornResult(g, f, query_ids, qb, rounds, actor_stats)


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


def run_bias_job(cfg: Config) -> dict[str, Any]:
    """Compute and write the text bias the config describes; return the job's summary."""
    cfg = resolve_stage_uris(cfg)
    sk = cfg.sinkhorn
    if not sk.checkpoint:
        raise BiasJobError("set sinkhorn.checkpoint to a GPA checkpoint (or run) URI")
    started = time.perf_counter()
    checkpoint = start_embedding_job(
        cfg, sk.checkpoint, sk.embed_pool, "sinkhorn.embed_pool", sk.output
    )

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
    embedded = time.perf_counter()
    logger.info("embedded %d captions and %d training clips", len(texts), queries.count())
    result = distributed_sinkhorn(checkpoint, queries, texts, sk, cfg.storage)
    finished = time.perf_counter()

    if not bool(torch.isfinite(result.g).all()):
        raise BiasJobError("the text bias is not finite: check the checkpoint's scores")
    seconds = {"embed": round(embedded - started, 3), "sinkhorn": round(finished - embedded, 3)}
    metadata = _metadata(cfg, checkpoint, result, seconds)
    write_bias(sk.output, bias_table(captions, result.g, result.qb_norm), metadata, cfg.storage)
    logger.info("wrote the text bias of %d captions to %s", len(texts), sk.output)
    return {
        "output": sk.output,
        **{k: metadata[k] for k in ("G", "J", "epsilon", "n_iter", "checkpoint", "num_actors")},
        "seconds": round(time.perf_counter() - started, 3),
        "bias": metadata["bias"],
    }

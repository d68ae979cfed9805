"""Sinkhorn text biases over the full test pool (GPA eq 10), distributed on Ray.

GPA scores G training audio clips (queries) against the J test captions, R' [G, J], and
turns the text potential g of an entropic transport with uniform marginals into an
additive A2T bias (`gpa_ray.sinkhorn` has the math). At AudioCaps size R' is 49k x 4.8k;
at WavCaps size it no longer fits one machine, so this job never builds it whole:

1. **Texts.** The captions of the test split are read on the driver (only `clip_id` and
   `captions`; text id `<clip_id>#<caption index>`, as in the index) and embedded with
   Ray Data: `map_batches(TextEmbedder)` on an actor pool with fractional CPUs, each actor
   loading the GPA checkpoint once. The J text embeddings (global + K+1 prototypes) come
   back to the driver and are put in the object store once.
2. **Queries.** The training clips are read and embedded by Ray Data the same way
   (`ClipEmbedder`, through `AudioInputs`, the one preprocessing path of training and
   serving) and materialised in the object store; they never pass through the driver.
   The dataset is cut into row ranges whose blocks go to `QueryBlock` actors: `num_actors`
   of them, or ceil(G / `rows_per_actor`) so that an actor's share stays the same size
   however large G gets (`actor_count`).
3. **Iterations.** Each `QueryBlock` owns its rows of R'. Every round the driver
   broadcasts g (one `ray.put`); each actor computes f for its rows and its column
   log-sum-exp (a J-vector) from its R' rows; the driver combines the J-vectors
   (`combine_column_lse`) and computes the new g (`column_potential`). R' rows are scored
   in [block_size, text_block_size] tiles (`GPAModel.iter_score_blocks`) and assembled
   into [block_size, J] row blocks. In the first round an actor keeps as many leading row
   blocks as fit `sinkhorn.memory_budget_mb`; every later round reuses those and recomputes
   only the rest, holding at most one further row block. Per-actor memory is therefore
   bounded by the budget plus O(block x J) whatever G is, and the compute is one scoring
   pass when the budget holds the actor's rows (the usual case) and degrades gradually,
   not all at once, when it does not.
   The first round also reduces QB-Norm's querybank statistics (a J-vector LSE and a
   J-vector activation mask), so evaluation can compare against QB-Norm without R' either.
4. **Output** at `sinkhorn.output` (local or s3://): `bias.parquet` (`text_id`, `clip_id`,
   `caption`, `bias`, `qb_lse`, `qb_active`), `bias.json` (G, J, epsilon, n_iter, the
   checkpoint, a UTC timestamp, per-round progress, per-actor memory) and `config.yaml`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import resource
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import Tensor

from gpa_ray import storage
from gpa_ray.config import Config, SinkhornConfig, StorageConfig, dump_config
from gpa_ray.data.loaders import LoaderError, split_files
from gpa_ray.index.store import text_id
from gpa_ray.models.gpa import Embeddings, GPAModel
from gpa_ray.sinkhorn import (
    QBNormStats,
    column_lse,
    column_potential,
    combine_column_lse,
    combine_qb_norm_statistics,
    qb_norm_statistics,
    row_potential,
)

logger = logging.getLogger(__name__)

BIAS_FILE = "bias.parquet"
META_FILE = "bias.json"
CONFIG_FILE = "config.yaml"
BIAS_SCHEMA = pa.schema(
    [
        pa.field("text_id", pa.string(), nullable=False),
        pa.field("clip_id", pa.string(), nullable=False),
        pa.field("caption", pa.string(), nullable=False),
        pa.field("bias", pa.float32(), nullable=False),
        pa.field("qb_lse", pa.float32(), nullable=False),
        pa.field("qb_active", pa.bool_(), nullable=False),
    ]
)
"""The bias table: g_j per test caption, plus QB-Norm's querybank statistics for it."""


class BiasJobError(RuntimeError):
    """The bias job cannot run as configured, or a bias output is unusable."""


@dataclasses.dataclass(frozen=True)
class EmbedSettings:
    """How Ray Data embeds: actors in the pool, CPUs per actor, rows per model call."""

    actors: int = 1
    cpus: float = 0.5
    batch_size: int = 16


# ------------------------------------------------------------------ embeddings on Ray Data


def embedding_table(ids: Sequence[str], id_column: str, emb: Embeddings) -> pa.Table:
    """Ids plus `global` [E] and (if any) row-major `prototypes` [(K+1)*E] as float32
    fixed-size lists: a plain Arrow layout that any reader turns back into tensors."""
    g = emb.global_.detach().float().cpu().numpy()
    columns: dict[str, pa.Array] = {
        id_column: pa.array(list(ids), pa.string()),
        "global": pa.FixedSizeListArray.from_arrays(pa.array(g.reshape(-1)), g.shape[1]),
    }
    if emb.prototypes is not None:
        p = emb.prototypes.detach().float().cpu().numpy()
        flat = p.reshape(p.shape[0], -1)
        columns["prototypes"] = pa.FixedSizeListArray.from_arrays(
            pa.array(flat.reshape(-1)), flat.shape[1]
        )
    return pa.table(columns)


def _fixed_size_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-size-list float column as an owned float32 matrix [rows, width].

    Exactly one copy: each chunk is viewed in place, then concatenated. The copy is
    needed (Arrow buffers are read-only, often object-store memory, and tensors made from
    them must not alias them); a second one would double the peak memory of a bias
    actor loading its queries."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    width = column.type.list_size
    parts = [
        chunk.flatten().to_numpy(zero_copy_only=False).reshape(len(chunk), width)
        for chunk in chunks
    ]
    if not parts:
        return np.empty((0, width), dtype=np.float32)
    return np.concatenate(parts).astype(np.float32, copy=False)


def embeddings_from_table(table: pa.Table, id_column: str) -> tuple[list[str], Embeddings]:
    """Inverse of `embedding_table`: (ids, Embeddings) in the table's row order."""
    ids = table.column(id_column).to_pylist()
    global_ = torch.from_numpy(_fixed_size_matrix(table.column("global")))
    if "prototypes" not in table.column_names:
        return ids, Embeddings(global_)
    flat = torch.from_numpy(_fixed_size_matrix(table.column("prototypes")))
    return ids, Embeddings(global_, flat.reshape(len(ids), -1, global_.shape[1]))


def _threads(cpus: float) -> int:
    """Torch threads for an actor holding `cpus` CPUs (1 below one CPU: more threads on a
    shared core only contend)."""
    return max(1, int(cpus))


class _CheckpointEmbedder:
    """Loads the GPA checkpoint once per Ray Data actor."""

    def __init__(self, checkpoint: str, storage_cfg: StorageConfig, cpus: float) -> None:
        from gpa_ray.checkpoints import load_gpa

        torch.set_num_threads(_threads(cpus))
        self.model, self.model_cfg = load_gpa(checkpoint, storage_cfg, "cpu")


class ClipEmbedder(_CheckpointEmbedder):
    """Ray Data callable: clip-shard rows (`clip_id`, `audio` or `codes`) -> embeddings."""

    def __init__(self, checkpoint: str, storage_cfg: StorageConfig, cpus: float) -> None:
        from gpa_ray.audio.inputs import AudioInputs

        super().__init__(checkpoint, storage_cfg, cpus)
        self.inputs = AudioInputs.from_config(self.model_cfg)

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        inputs = self.inputs.collate([self.inputs.from_row(row) for row in rows])
        emb = self.model.embed_audio(inputs)
        return embedding_table([row["clip_id"] for row in rows], "clip_id", emb)


class TextEmbedder(_CheckpointEmbedder):
    """Ray Data callable: (`text_id`, `caption`) rows -> embeddings."""

    @torch.inference_mode()
    def __call__(self, batch: pa.Table) -> pa.Table:
        emb = self.model.embed_text(batch.column("caption").to_pylist())
        return embedding_table(batch.column("text_id").to_pylist(), "text_id", emb)


def audio_columns(checkpoint: str, storage_cfg: StorageConfig | None = None) -> list[str]:
    """Clip columns the checkpoint's audio tower needs: `codes` (AudioFormer) or `audio`."""
    from gpa_ray.audio.inputs import AudioInputs
    from gpa_ray.checkpoints import read_config

    needs_codes = AudioInputs.from_config(read_config(checkpoint, storage_cfg)).needs_codes
    return ["clip_id", "codes" if needs_codes else "audio"]


def embed_clips(
    checkpoint: str,
    data: str,
    split: str,
    *,
    corpus: str = "",
    settings: EmbedSettings | None = None,
    storage_cfg: StorageConfig | None = None,
) -> Any:
    """Every clip of one split of an ingest output, embedded on a Ray Data actor pool.

    Returns a materialised Dataset (`clip_id`, `global`, `prototypes`) whose blocks stay in
    the object store. `checkpoint` must be a resolved checkpoint directory.
    """

    from gpa_ray.data.loaders import read_clips

    storage_cfg = storage_cfg or StorageConfig()
    settings = settings or EmbedSettings()
    clips = read_clips(
        data,
        split,
        corpus=corpus,
        columns=audio_columns(checkpoint, storage_cfg),
        storage_cfg=storage_cfg,
    )
    return _on_actor_pool(clips, ClipEmbedder, checkpoint, settings, storage_cfg).materialize()


def _on_actor_pool(
    dataset: Any,
    embedder: type,
    checkpoint: str,
    settings: EmbedSettings,
    storage_cfg: StorageConfig,
) -> Any:
    """`dataset` embedded by `embedder` actors, each loading the checkpoint once."""
    import ray

    return dataset.map_batches(
        embedder,
        fn_constructor_args=(checkpoint, storage_cfg, settings.cpus),
        batch_format="pyarrow",
        batch_size=settings.batch_size,
        compute=ray.data.ActorPoolStrategy(size=settings.actors),
        num_cpus=settings.cpus,
    )


def read_captions(
    data: str, split: str, corpus: str = "", storage_cfg: StorageConfig | None = None
) -> pa.Table:
    """(`text_id`, `clip_id`, `caption`) for every caption of a split, clip-major, in file
    order. Only two small columns are read, never audio or codes."""
    files = split_files(data, split, corpus, storage_cfg)
    if not files:
        where = storage.join(data, "clips", corpus or "*", split)
        raise LoaderError(f"no clip shards found at {where}; run ingest first")
    ids: list[str] = []
    clip_ids: list[str] = []
    captions: list[str] = []
    for uri in files:
        fs, path = storage.resolve(uri, storage_cfg)
        for row in pq.read_table(path, filesystem=fs, columns=["clip_id", "captions"]).to_pylist():
            for index, caption in enumerate(row["captions"]):
                ids.append(text_id(row["clip_id"], index))
                clip_ids.append(row["clip_id"])
                captions.append(caption)
    if not ids:
        raise LoaderError(f"split {split!r} under {data} has no captions")
    return pa.table({"text_id": ids, "clip_id": clip_ids, "caption": captions})


def embed_captions(
    checkpoint: str,
    captions: pa.Table,
    *,
    settings: EmbedSettings | None = None,
    storage_cfg: StorageConfig | None = None,
) -> Embeddings:
    """Embeddings of `captions` (`text_id`, `caption`) on a Ray Data actor pool, gathered
    on the driver in the table's row order."""
    import ray

    storage_cfg = storage_cfg or StorageConfig()
    settings = settings or EmbedSettings()
    texts = ray.data.from_arrow(captions.select(["text_id", "caption"]))
    dataset = _on_actor_pool(texts, TextEmbedder, checkpoint, settings, storage_cfg)
    return collect_embeddings(dataset, "text_id", captions.column("text_id").to_pylist())


def gather_embeddings(dataset: Any, id_column: str) -> tuple[list[str], Embeddings]:
    """Bring an embedding dataset to the driver: (ids, Embeddings) in the dataset's order."""
    import ray

    tables = ray.get(list(dataset.to_arrow_refs()))
    return embeddings_from_table(pa.concat_tables(tables), id_column)


def collect_embeddings(dataset: Any, id_column: str, order: Sequence[str]) -> Embeddings:
    """Gather an embedding dataset on the driver, in the order of the ids `order`."""
    ids, emb = gather_embeddings(dataset, id_column)
    position = {item: i for i, item in enumerate(ids)}
    missing = [item for item in order if item not in position]
    if missing or len(ids) != len(order):
        raise BiasJobError(
            f"embedding dataset has {len(ids)} rows for {len(order)} ids "
            f"(missing e.g. {missing[:3]})"
        )
    return emb[torch.tensor([position[item] for item in order], dtype=torch.long)]


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
    for block in model.iter_score_blocks(queries, texts, block_size, text_block_size):
        if block.audio_start != current and tiles:
            yield torch.cat(tiles, dim=1)
            tiles = []
        current = block.audio_start
        tiles.append(block.scores)
    if tiles:
        yield torch.cat(tiles, dim=1)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class QueryBlock:
    """One actor's slice of the training queries and its rows of R' (cached or recomputed).

    Created with the object refs of its query embedding blocks (fetched here, not through
    the driver), the text embeddings and G, the number of queries over all actors.
    """

    def __init__(
        self,
        checkpoint: str,
        storage_cfg: StorageConfig,
        query_blocks: list[Any],
        texts: Embeddings,
        n_rows_total: int,
        cfg: SinkhornConfig,
    ) -> None:
        import ray

        from gpa_ray.checkpoints import load_gpa

        torch.set_num_threads(_threads(cfg.cpus_per_actor))
        self.cfg = cfg
        self.n_rows_total = n_rows_total
        self.model, _ = load_gpa(checkpoint, storage_cfg, "cpu")
        table = pa.concat_tables(ray.get(list(query_blocks)))
        self.query_ids, self.queries = embeddings_from_table(table, "clip_id")
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
        """One round for these rows: f from g, and this block's column LSE [J] (and, if
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
        """(query clip ids, f) of this block after the last round."""
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
    """How many `QueryBlock` actors share G = `n_rows` queries: ceil(G / rows_per_actor)
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
    queries: Any,
    texts: Embeddings,
    cfg: SinkhornConfig,
    storage_cfg: StorageConfig | None = None,
) -> SinkhornResult:
    """GPA eq 10 over R' = scores(queries, texts) with rows split over `actor_count`
    `QueryBlock` actors; only J-vectors travel each round. `queries` is a materialised
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
    actor_class = ray.remote(QueryBlock).options(num_cpus=cfg.cpus_per_actor)
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


def bias_table(captions: pa.Table, result: SinkhornResult) -> pa.Table:
    """The output rows: one per caption, in the captions' order."""
    return pa.table(
        {
            "text_id": captions.column("text_id"),
            "clip_id": captions.column("clip_id"),
            "caption": captions.column("caption"),
            "bias": pa.array(result.g.float().numpy(), pa.float32()),
            "qb_lse": pa.array(result.qb_norm.lse.float().numpy(), pa.float32()),
            "qb_active": pa.array(result.qb_norm.active.numpy(), pa.bool_()),
        },
        schema=BIAS_SCHEMA,
    )


def read_bias(
    uri: str, storage_cfg: StorageConfig | None = None
) -> tuple[pa.Table, dict[str, Any]]:
    """A bias job output folder -> (the bias table, its metadata)."""
    try:
        table = storage.read_parquet(storage.join(uri, BIAS_FILE), storage_cfg)
        metadata = json.loads(storage.read_bytes(storage.join(uri, META_FILE), storage_cfg))
    except storage.StorageError as exc:
        raise BiasJobError(
            f"no text bias at {uri} (expected {BIAS_FILE} and {META_FILE}; run "
            f"jobs/sinkhorn_bias.py): {exc}"
        ) from exc
    return table, metadata


def align_to_texts(table: pa.Table, column: str, text_ids: Sequence[str]) -> Tensor:
    """`column` of a bias table in the order of `text_ids` (all must be present)."""
    ids = table.column("text_id").to_pylist()
    values = dict(zip(ids, table.column(column).to_pylist(), strict=True))
    missing = [t for t in text_ids if t not in values]
    if missing:
        raise BiasJobError(
            f"the bias covers {len(values)} texts but not {len(missing)} of the {len(text_ids)} "
            f"asked for (e.g. {missing[:3]}): was it computed for this test split?"
        )
    return torch.tensor([values[t] for t in text_ids])


def _resolved_sources(cfg: Config) -> tuple[str, str]:
    queries = cfg.sinkhorn.queries or cfg.train.data or cfg.ingest.output
    return queries, cfg.sinkhorn.texts or queries


def run_bias_job(cfg: Config) -> dict[str, Any]:
    """Compute and write the text bias the config describes; return the job's summary."""
    from gpa_ray.checkpoints import resolve_checkpoint

    sk = cfg.sinkhorn
    if not sk.checkpoint:
        raise BiasJobError("set sinkhorn.checkpoint to a GPA checkpoint (or run) URI")
    started = time.perf_counter()
    checkpoint = resolve_checkpoint(sk.checkpoint, "best", cfg.storage)
    queries_uri, texts_uri = _resolved_sources(cfg)
    settings = EmbedSettings(sk.embed_actors, sk.embed_cpus, sk.embed_batch_size)
    dump_config(cfg, storage.join(sk.output, CONFIG_FILE))

    captions = read_captions(texts_uri, sk.texts_split, sk.corpus, cfg.storage)
    texts = embed_captions(checkpoint, captions, settings=settings, storage_cfg=cfg.storage)
    queries = embed_clips(
        checkpoint,
        queries_uri,
        sk.queries_split,
        corpus=sk.corpus,
        settings=settings,
        storage_cfg=cfg.storage,
    )
    embedded = time.perf_counter()
    logger.info("embedded %d captions and %d training clips", len(texts), queries.count())
    result = distributed_sinkhorn(checkpoint, queries, texts, sk, cfg.storage)
    finished = time.perf_counter()

    bias = result.g
    if not bool(torch.isfinite(bias).all()):
        raise BiasJobError("the text bias is not finite: check the checkpoint's scores")
    table = bias_table(captions, result)
    metadata = {
        "G": len(result.query_ids),
        "J": len(texts),
        "epsilon": sk.epsilon,
        "n_iter": sk.n_iter,
        "checkpoint": checkpoint,
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "queries": {"data": queries_uri, "split": sk.queries_split, "corpus": sk.corpus},
        "texts": {"data": texts_uri, "split": sk.texts_split, "corpus": sk.corpus},
        "qb_norm": {"beta": sk.qb_norm_beta, "k": sk.qb_norm_k},
        "num_actors": len(result.actors),
        "rows_per_actor": sk.rows_per_actor,
        "block_size": sk.block_size,
        "text_block_size": sk.text_block_size,
        "memory_budget_mb": sk.memory_budget_mb,
        "rounds": result.rounds,
        "actors": result.actors,
        "seconds": {
            "embed": round(embedded - started, 3),
            "sinkhorn": round(finished - embedded, 3),
        },
        "bias": {
            "min": float(bias.min()),
            "max": float(bias.max()),
            "mean": float(bias.mean()),
            "std": float(bias.std()) if len(bias) > 1 else 0.0,
        },
    }
    storage.write_parquet(storage.join(sk.output, BIAS_FILE), table, cfg.storage)
    storage.write_bytes(
        storage.join(sk.output, META_FILE), json.dumps(metadata, indent=2).encode(), cfg.storage
    )
    total = time.perf_counter() - started
    logger.info("wrote the text bias of %d captions to %s", len(texts), sk.output)
    summary = {
        "output": sk.output,
        **{k: metadata[k] for k in ("G", "J", "epsilon", "n_iter", "checkpoint", "num_actors")},
        "seconds": round(total, 3),
        "bias": metadata["bias"],
    }
    return summary

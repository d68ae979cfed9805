"""One actor's share of the Sinkhorn bias job (GPA eq 10): its rows of R' and their updates.

A `QueryShard` owns a contiguous slice of the G training queries and computes, every
round, f for its rows and their column log-sum-exp (a J-vector); `gpa_ray.bias_job` runs
the rounds. What it holds, and why that scales and survives:

- **Its queries** (`QueryPart`): Arrow blocks in the object store (a materialised Ray
  Dataset) or row ranges of the embedding files the job stored at its output. Both
  outlive the actor, so a restarted actor (a spot node reclaimed, an OOM kill) reloads the
  same rows in its constructor and recomputes its R' rows; the round in flight is retried
  on it (`max_task_retries`), and a round is a pure function of g, so nothing is lost.
- **The text embeddings**, put in the object store once by the driver as numpy arrays
  (`share_texts`): every actor on a node maps the same shared-memory object, zero-copy
  and read-only, instead of holding a private copy (~2 GB per actor at J = 100k, E = 1024).
  The constructor measures it: the anonymous (private) memory the texts added, after every
  page of them was read, next to their size (`stats()`).
- **R' rows**: in the first round it keeps as many leading row blocks as fit
  `sinkhorn.memory_budget_mb`; later rounds reuse them and recompute only the rest,
  holding at most one further row block.

Its Ray `memory` request is `actor_memory_bytes`, computed from its share.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from torch import Tensor

from gpa_ray import storage
from gpa_ray.config import SinkhornConfig, StorageConfig
from gpa_ray.embedding_table import embeddings_from_table
from gpa_ray.models import fused_lass
from gpa_ray.models.gpa import Embeddings
from gpa_ray.models.scoring import LASSScorer, PrototypeScorer, build_scorer
from gpa_ray.sinkhorn import (
    QBNormStats,
    combine_column_lse,
    combine_qb_norm_statistics,
)
from gpa_ray.sinkhorn_fast import column_lse_fast, qb_norm_statistics_fast, row_potential_fast

if TYPE_CHECKING:
    import ray

MB = 2**20


@dataclasses.dataclass(frozen=True)
class ScorerWeights:
    """All the job needs of a GPA checkpoint: its scorer's kind, prototype count (K+1) and
    weights. The job scores stored embeddings, R = S_g + S'_p (eq 9), and never runs the
    towers, so the driver reads these once and every actor builds just the scorer: no
    tower weights in its memory, no text/audio model code imported in its process."""

    kind: str
    n_prototypes: int
    state: dict[str, Tensor]

    def build(self) -> PrototypeScorer | None:
        scorer = build_scorer(self.kind, self.n_prototypes, self.n_prototypes)
        if scorer is not None:
            scorer.load_state_dict(self.state)
            scorer.eval()
        return scorer


def score_tile(scorer: PrototypeScorer | None, audio: Embeddings, text: Embeddings) -> Tensor:
    """R = S_g + S'_p (eq 9) for every audio x text pair of a tile, as `GPAModel.score`."""
    scores = audio.global_ @ text.global_.T
    if scorer is None:
        return scores
    if audio.prototypes is None or text.prototypes is None:
        raise ValueError("this GPA model scores prototypes but the embeddings have none")
    return scores + scorer.score_pairs(audio.prototypes, text.prototypes)


def iter_row_blocks(
    scorer: PrototypeScorer | None,
    queries: Embeddings,
    texts: Embeddings,
    block_size: int,
    text_block_size: int,
) -> Iterator[Tensor]:
    """R' in row blocks [<= block_size, J], each assembled from [block, text_block] tiles, so
    at most one row block (plus one tile's scorer intermediates) is alive at a time."""
    if block_size <= 0 or text_block_size <= 0:
        raise ValueError("block sizes must be positive")
    for a0 in range(0, len(queries), block_size):
        audio = queries[a0 : a0 + block_size]
        tiles = [
            score_tile(scorer, audio, texts[t0 : t0 + text_block_size])
            for t0 in range(0, len(texts), text_block_size)
        ]
        yield torch.cat(tiles, dim=1)


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def process_memory_mb() -> dict[str, float]:
    """This process's resident memory in MB from /proc/self/status (Linux): `rss`, its
    `anon` part (private heap: what a copy of the texts would add), `shmem` (shared memory,
    where the object store's objects are mapped), `file`; and `peak` (VmHWM)."""
    fields = {"VmRSS": "rss", "RssAnon": "anon", "RssShmem": "shmem", "RssFile": "file"}
    fields["VmHWM"] = "peak"
    out: dict[str, float] = {}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {"peak": peak_rss_mb()}
    for line in lines:
        key, _, value = line.partition(":")
        if key in fields:
            out[fields[key]] = int(value.split()[0]) / 1024.0
    return out


# ------------------------------------------------------------------ what an actor loads


@dataclasses.dataclass(frozen=True)
class StoredRows:
    """Rows [start, stop) of one stored embedding file (`clip_id` + embedding columns)."""

    uri: str
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class QueryPart:
    """One actor's queries: Arrow blocks in the object store (`blocks`) or row ranges of
    stored embedding files (`files`); `rows` of them in all."""

    rows: int
    blocks: tuple[ray.ObjectRef, ...] = ()
    files: tuple[StoredRows, ...] = ()

    def load(self, storage_cfg: StorageConfig) -> pa.Table:
        """The part's rows as one table (fetched here, never through the driver)."""
        import ray

        tables = list(ray.get(list(self.blocks))) if self.blocks else []
        for part in self.files:
            table = storage.read_parquet(part.uri, storage_cfg)
            tables.append(table.slice(part.start, part.stop - part.start))
        table = pa.concat_tables(tables)
        if table.num_rows != self.rows:
            raise RuntimeError(f"query part has {table.num_rows} rows, expected {self.rows}")
        return table


def share_texts(texts: Embeddings) -> ray.ObjectRef:
    """Put the text embeddings in the object store once, as float32 numpy arrays: actors
    that get them read the shared object in place (numpy is Ray's zero-copy type)."""
    import ray

    arrays = {"global": np.ascontiguousarray(texts.global_.numpy(), dtype=np.float32)}
    if texts.prototypes is not None:
        arrays["prototypes"] = np.ascontiguousarray(texts.prototypes.numpy(), dtype=np.float32)
    return ray.put(arrays)


def texts_from_shared(arrays: dict[str, np.ndarray]) -> Embeddings:
    """Embeddings viewing the shared arrays (read-only: scoring only reads them)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        global_ = torch.from_numpy(arrays["global"])
        protos = torch.from_numpy(arrays["prototypes"]) if "prototypes" in arrays else None
    return Embeddings(global_, protos)


def actor_memory_bytes(
    rows: int, n_texts: int, n_prototypes: int, dim: int, cfg: SinkhornConfig
) -> int:
    """Ray `memory` request of a `QueryShard` with `rows` queries against `n_texts` texts
    (P = `n_prototypes` = K+1 prototypes of width E = `dim`, float32 = 4 bytes):

        actor_overhead_mb                          torch, the loaded GPA, Ray's worker
      + rows x (1 + P) x E x 4                     its own copy of its queries
      + min(memory_budget_mb, rows x J x 4)        cached R' rows
      + 3 x block_size x J x 4                     a row block, its tiles, an LSE temporary
      + 16 x block_size x text_block_size x P^2 x 4    one tile's scorer temporaries

    The text embeddings are not in it: they are in the object store, once per node."""
    queries = rows * (1 + n_prototypes) * dim * 4
    cache = min(int(cfg.memory_budget_mb * MB), rows * n_texts * 4)
    block = min(cfg.block_size, max(rows, 1))
    working = 3 * block * n_texts * 4
    tile = 16 * block * min(cfg.text_block_size, n_texts) * max(n_prototypes, 1) ** 2 * 4
    return int(cfg.actor_overhead_mb * MB) + queries + cache + working + tile


# ------------------------------------------------------------------ the actor


def _use_fused_scorer(scorer: PrototypeScorer | None) -> str:
    """Switch a LASS scorer to the fused kernel (forward-only scoring is all this job
    does); returns which scorer path scores R' here, for the job's log."""
    if not isinstance(scorer, LASSScorer):
        return "none" if scorer is None else type(scorer).__name__
    scorer.fused = True
    built = fused_lass.available(scorer.l_a.in_features, scorer.l_t.in_features)
    return "lass-fused" if built else "lass-plain"


class QueryShard:
    """One actor's slice of the training queries and its rows of R' (cached or recomputed).

    Created with the checkpoint's `ScorerWeights`, its `QueryPart`, the object ref of the
    shared text embeddings (in a list, so the constructor, not Ray, fetches it and can
    measure what it costs) and G, the number of queries over all actors."""

    def __init__(
        self,
        weights: ScorerWeights,
        storage_cfg: StorageConfig,
        part: QueryPart,
        shared_texts: list[ray.ObjectRef],
        n_rows_total: int,
        cfg: SinkhornConfig,
    ) -> None:
        import ray

        self._cpu_start = time.process_time()
        # One thread per whole CPU held, at least one (as `ray_embedding.torch_threads`,
        # not imported here: that module brings the towers' model code with it).
        torch.set_num_threads(max(1, int(cfg.cpus_per_actor)))
        self.cfg = cfg
        self.n_rows_total = n_rows_total
        self.scorer = weights.build()
        self.scorer_path = _use_fused_scorer(self.scorer)
        table = part.load(storage_cfg)
        self.query_ids = table.column("clip_id").to_pylist()
        self.queries = embeddings_from_table(table)
        del table
        with warnings.catch_warnings():  # Ray's own property reads a deprecated field
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self._texts = self._attach_texts(shared_texts[0])
        self.texts = texts_from_shared(self._texts)
        self.budget_bytes = int(cfg.memory_budget_mb * MB)
        self.largest_block = 0
        self.score_passes = 0
        self.score_seconds = 0.0
        # Leading row blocks of R' kept from the first round (a prefix of the rows).
        self._cached: list[Tensor] = []
        self._cached_rows = 0
        self.f = torch.zeros(len(self.queries))

    def _attach_texts(self, ref: ray.ObjectRef) -> dict[str, np.ndarray]:
        """Fetch the shared texts and read every page of them once, recording how much
        private memory that added (`texts_private_mb`: ~0 when they are shared)."""
        import ray

        before = process_memory_mb()
        arrays = ray.get(ref)
        checksum = sum(float(array.sum(dtype=np.float64)) for array in arrays.values())
        after = process_memory_mb()
        self.text_memory = {
            "texts_mb": round(sum(a.nbytes for a in arrays.values()) / MB, 1),
            "texts_read_only": all(not a.flags.writeable for a in arrays.values()),
            "texts_private_mb": round(after.get("anon", 0.0) - before.get("anon", 0.0), 1),
            "texts_shared_mb": round(after.get("shmem", 0.0) - before.get("shmem", 0.0), 1),
        }
        self.texts_checksum = checksum  # the pages were really read
        return arrays

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
            self.scorer, rest, self.texts, cfg.block_size, cfg.text_block_size
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
        asked, QB-Norm's statistics of these querybank rows). A function of g alone, so
        a round retried on a restarted actor gives the same answer."""
        cfg = self.cfg
        f_parts: list[Tensor] = []
        partials: list[Tensor] = []
        qb_parts: list[QBNormStats] = []
        for block in self._row_blocks():
            f_block = row_potential_fast(block, g, cfg.epsilon, self.n_rows_total)
            f_parts.append(f_block)
            partials.append(column_lse_fast(block, f_block, cfg.epsilon))
            if with_qb_norm:
                qb_parts.append(qb_norm_statistics_fast(block, cfg.qb_norm_beta, cfg.qb_norm_k))
        self.f = torch.cat(f_parts)
        qb = combine_qb_norm_statistics(qb_parts) if with_qb_norm else None
        return combine_column_lse(partials), qb

    def ready(self) -> bool:
        """Answers once the constructor is done (the driver times the actors' start)."""
        return True

    def potentials(self) -> tuple[list[str], Tensor]:
        """(query clip ids, f) of this shard after the last round."""
        return self.query_ids, self.f

    def pid(self) -> int:
        """The actor's process id (fault tests kill it)."""
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        memory = process_memory_mb()
        return {
            "rows": len(self.queries),
            "cached_rows": self._cached_rows,
            "cached_mb": round(self.cached_bytes / MB, 1),
            "largest_block_elements": self.largest_block,
            "score_passes": self.score_passes,
            "score_seconds": round(self.score_seconds, 4),
            "cpu_seconds": round(time.process_time() - self._cpu_start, 3),
            "scorer": self.scorer_path,
            "restarted": self.restarted,
            "peak_rss_mb": round(memory.get("peak", peak_rss_mb()), 1),
            "rss_mb": round(memory.get("rss", math.nan), 1),
            "rss_anon_mb": round(memory.get("anon", math.nan), 1),
            "rss_shmem_mb": round(memory.get("shmem", math.nan), 1),
            **self.text_memory,
        }

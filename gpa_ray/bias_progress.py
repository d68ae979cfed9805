"""What the bias job keeps at its output so that a rerun resumes: the embeddings (written
once) and the potentials after every round. A driver killed at any point and the same
command run again reuses the embeddings and resumes at the round after the last one
written; the result equals an undisturbed run (every round is a function of g alone).

    <output>/embeddings/texts.parquet                text_id + embedding columns, caption order
    <output>/embeddings/queries/part-NNNNN.parquet   clip_id + embedding columns, one per block
    <output>/embeddings/manifest.json                written last: files, row counts, source
    <output>/rounds/settings.json                    epsilon, QB-Norm settings, embeddings id
    <output>/rounds/round-NNNN.parquet               g after round N (J rows; round 1 also
                                                     QB-Norm's statistics); its log record in
                                                     the schema metadata

Every file is written atomically (`gpa_ray.storage`), so a file that exists is whole. The
query files are written by Ray tasks (one per block of the embedded dataset, retried on a
storage error), never through the driver. A rerun whose embedding inputs (weights, clip
shards, splits, batch size: `gpa_ray.embedding_inputs`) or Sinkhorn settings differ from
what is stored is refused by name rather than mixed in.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import torch
from torch import Tensor

from gpa_ray import storage
from gpa_ray.bias_shard import QueryPart, StoredRows
from gpa_ray.config import SinkhornConfig, StorageConfig
from gpa_ray.embedding_table import embedding_table, embeddings_from_table
from gpa_ray.models.gpa import Embeddings
from gpa_ray.sinkhorn import QBNormStats

if TYPE_CHECKING:
    import ray.data

MANIFEST = "manifest.json"
SETTINGS = "settings.json"
ROUND_KEY = b"gpa_ray.round"


class StoredStateError(RuntimeError):
    """What is stored at the job's output was computed from other inputs or settings."""


def _mismatch(what: str, uri: str, stored: dict[str, Any], wanted: dict[str, Any]) -> None:
    differing = {k: (stored.get(k), wanted.get(k)) for k in wanted if stored.get(k) != wanted[k]}
    if differing:
        listed = ", ".join(f"{k}: stored {a!r}, now {b!r}" for k, (a, b) in differing.items())
        raise StoredStateError(
            f"{uri} holds {what} of another run ({listed}); use another sinkhorn.output "
            "or delete it"
        )


# ------------------------------------------------------------------ embeddings, once


@dataclasses.dataclass(frozen=True)
class StoredEmbeddings:
    """The embeddings at `<output>/embeddings`: query files with their row counts."""

    root: str
    embedding_id: str
    n_texts: int
    query_files: tuple[tuple[str, int], ...]

    @property
    def n_queries(self) -> int:
        return sum(rows for _, rows in self.query_files)

    @property
    def texts_file(self) -> str:
        return storage.join(self.root, "texts.parquet")

    def parts(self, n_parts: int) -> list[QueryPart]:
        """The queries in `n_parts` contiguous row ranges of near-equal size."""
        total = self.n_queries
        bounds = [total * i // n_parts for i in range(n_parts + 1)]
        parts = []
        for start, stop in zip(bounds, bounds[1:], strict=False):
            pieces, offset = [], 0
            for uri, rows in self.query_files:
                lo, hi = max(start, offset), min(stop, offset + rows)
                if lo < hi:
                    pieces.append(StoredRows(uri, lo - offset, hi - offset))
                offset += rows
            parts.append(QueryPart(rows=stop - start, files=tuple(pieces)))
        return parts

    def read_texts(self, storage_cfg: StorageConfig) -> tuple[list[str], Embeddings]:
        table = storage.read_parquet(self.texts_file, storage_cfg)
        return table.column("text_id").to_pylist(), embeddings_from_table(table)


def load_embeddings(
    output: str, source: dict[str, Any], storage_cfg: StorageConfig
) -> StoredEmbeddings | None:
    """The embeddings a previous run stored at `output`, or None if it stored none (or
    was stopped before its manifest was written)."""
    root = storage.join(output, "embeddings")
    manifest_uri = storage.join(root, MANIFEST)
    if not storage.exists(manifest_uri, storage_cfg):
        return None
    manifest = json.loads(storage.read_bytes(manifest_uri, storage_cfg))
    _mismatch("embeddings", root, manifest["source"], source)
    files = tuple((storage.join(root, name), rows) for name, rows in manifest["queries"])
    return StoredEmbeddings(root, manifest["embedding_id"], manifest["texts"], files)


def _write_block(block: pa.Table, uri: str, storage_cfg: StorageConfig) -> int:
    """Ray task: one block of query embeddings as one parquet file; its row count."""
    storage.write_parquet(uri, block, storage_cfg)
    return block.num_rows


def store_embeddings(
    output: str,
    source: dict[str, Any],
    text_ids: list[str],
    texts: Embeddings,
    queries: ray.data.MaterializedDataset,
    storage_cfg: StorageConfig,
) -> StoredEmbeddings:
    """Write the texts (from the driver) and the query blocks (from Ray tasks), then the
    manifest that makes them a stored set."""
    import ray

    root = storage.join(output, "embeddings")
    storage.write_parquet(
        storage.join(root, "texts.parquet"),
        embedding_table(text_ids, "text_id", texts),
        storage_cfg,
    )
    write = ray.remote(_write_block).options(
        num_cpus=0.25, max_retries=3, retry_exceptions=[storage.StorageError]
    )
    names = []
    pending = []
    for index, ref in enumerate(queries.to_arrow_refs()):
        names.append(f"queries/part-{index:05d}.parquet")
        pending.append(write.remote(ref, storage.join(root, names[-1]), storage_cfg))
    counts = ray.get(pending)
    kept = [(name, rows) for name, rows in zip(names, counts, strict=True) if rows]
    manifest = {
        "embedding_id": uuid.uuid4().hex,
        "source": source,
        "texts": len(texts),
        "queries": kept,
    }
    storage.write_bytes(
        storage.join(root, MANIFEST), json.dumps(manifest, indent=2).encode(), storage_cfg
    )
    files = tuple((storage.join(root, name), rows) for name, rows in kept)
    return StoredEmbeddings(root, manifest["embedding_id"], len(texts), files)


# ------------------------------------------------------------------ potentials, every round


@dataclasses.dataclass(frozen=True)
class RoundState:
    """The potentials after round `round` (0: none yet): g, QB-Norm's statistics (from
    round 1) and the log records of rounds 1..`round`."""

    round: int
    g: Tensor
    qb: QBNormStats | None
    records: list[dict[str, float]]


class RoundLog:
    """`<output>/rounds`: g after every round, so a rerun resumes at the next round."""

    def __init__(
        self, root: str, settings: dict[str, Any], storage_cfg: StorageConfig | None = None
    ) -> None:
        self.root = root
        self.settings = settings
        self.storage_cfg = storage_cfg or StorageConfig()

    def _round_uri(self, index: int) -> str:
        return storage.join(self.root, f"round-{index:04d}.parquet")

    def start(self, n_texts: int, last_round: int) -> RoundState:
        """The stored state after round min(last written, `last_round`) (round 0, g = 0,
        if nothing usable is stored); records the settings for a run starting afresh."""
        settings_uri = storage.join(self.root, SETTINGS)
        if storage.exists(settings_uri, self.storage_cfg):
            stored = json.loads(storage.read_bytes(settings_uri, self.storage_cfg))
            _mismatch("Sinkhorn potentials", self.root, stored, self.settings)
        else:
            body = json.dumps(self.settings, indent=2).encode()
            storage.write_bytes(settings_uri, body, self.storage_cfg)
        state = RoundState(0, torch.zeros(n_texts), None, [])
        for index in range(1, last_round + 1):
            uri = self._round_uri(index)
            if not storage.exists(uri, self.storage_cfg):
                break
            table = storage.read_parquet(uri, self.storage_cfg)
            record = json.loads(table.schema.metadata[ROUND_KEY])
            g = torch.from_numpy(table.column("g").to_numpy().copy())
            qb = state.qb
            if index == 1:
                lse = torch.from_numpy(table.column("qb_lse").to_numpy().copy())
                active = torch.from_numpy(table.column("qb_active").to_numpy(False).copy())
                qb = QBNormStats(lse, active)
            state = RoundState(index, g, qb, [*state.records, record])
        return state

    def save(self, index: int, g: Tensor, qb: QBNormStats | None, record: dict[str, float]) -> None:
        """Write g after round `index` (with QB-Norm's statistics for round 1)."""
        columns: dict[str, Any] = {"g": pa.array(g.numpy(), pa.float32())}
        if index == 1:
            if qb is None:
                raise ValueError("round 1 carries QB-Norm's statistics")
            columns["qb_lse"] = pa.array(qb.lse.float().numpy(), pa.float32())
            columns["qb_active"] = pa.array(qb.active.numpy(), pa.bool_())
        table = pa.table(columns).replace_schema_metadata({ROUND_KEY: json.dumps(record)})
        storage.write_parquet(self._round_uri(index), table, self.storage_cfg)


def round_settings(cfg: SinkhornConfig, embedding_id: str) -> dict[str, Any]:
    """What the potentials depend on besides the round count: a rerun must match it."""
    return {
        "embedding_id": embedding_id,
        "epsilon": cfg.epsilon,
        "qb_norm_beta": cfg.qb_norm_beta,
        "qb_norm_k": cfg.qb_norm_k,
    }

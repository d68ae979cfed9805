"""The text-bias output format: what the Sinkhorn bias job writes and its readers use.

A bias output is a folder (local or s3://):

    bias.parquet   one row per test caption (`BIAS_SCHEMA`): `text_id`, `clip_id`,
                   `caption`, the bias g_j (GPA eq 10), and QB-Norm's querybank
                   statistics for the caption (`qb_lse`, `qb_active`)
    bias.json      provenance: G, J, epsilon, n_iter, the checkpoint, the pools, per-round
                   progress, per-actor memory, a UTC timestamp
    config.yaml    the resolved config of the job

Evaluation and the index build read it and align its values to their own caption order
with `align_to_texts`, the one aligner (a caption without a value is an error, never a 0).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pyarrow as pa
import torch

from gpa_ray import storage
from gpa_ray.config import StorageConfig
from gpa_ray.sinkhorn import QBNormStats

BIAS_FILE = "bias.parquet"
META_FILE = "bias.json"
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


class BiasFileError(LookupError):
    """A bias output is missing, or does not cover the captions asked for."""


def bias_table(captions: pa.Table, bias: torch.Tensor, qb_norm: QBNormStats) -> pa.Table:
    """The output rows: one per caption (`text_id`, `clip_id`, `caption`), in its order."""
    return pa.table(
        {
            "text_id": captions.column("text_id"),
            "clip_id": captions.column("clip_id"),
            "caption": captions.column("caption"),
            "bias": pa.array(bias.float().numpy(), pa.float32()),
            "qb_lse": pa.array(qb_norm.lse.float().numpy(), pa.float32()),
            "qb_active": pa.array(qb_norm.active.numpy(), pa.bool_()),
        },
        schema=BIAS_SCHEMA,
    )


def write_bias(
    uri: str, table: pa.Table, metadata: dict[str, Any], storage_cfg: StorageConfig | None = None
) -> None:
    """Write `bias.parquet`, then `bias.json` (each atomically)."""
    storage.write_parquet(storage.join(uri, BIAS_FILE), table, storage_cfg)
    storage.write_bytes(
        storage.join(uri, META_FILE), json.dumps(metadata, indent=2).encode(), storage_cfg
    )


def read_bias(
    uri: str, storage_cfg: StorageConfig | None = None
) -> tuple[pa.Table, dict[str, Any]]:
    """A bias output folder -> (the bias table, its metadata)."""
    try:
        table = storage.read_parquet(storage.join(uri, BIAS_FILE), storage_cfg)
        metadata = json.loads(storage.read_bytes(storage.join(uri, META_FILE), storage_cfg))
    except storage.StorageError as exc:
        raise BiasFileError(
            f"no text bias at {uri} (expected {BIAS_FILE} and {META_FILE}; run "
            f"jobs/sinkhorn_bias.py): {exc}"
        ) from exc
    return table, metadata


def align_to_texts(table: pa.Table, column: str, text_ids: Sequence[str]) -> torch.Tensor:
    """`column` of a bias table in the order of `text_ids`; every id must have a row."""
    values = dict(
        zip(table.column("text_id").to_pylist(), table.column(column).to_pylist(), strict=True)
    )
    missing = [t for t in text_ids if t not in values]
    if missing:
        raise BiasFileError(
            f"the bias covers {len(text_ids) - len(missing)} of the {len(text_ids)} texts asked "
            f"for (missing e.g. {missing[:3]}): was it computed for this test split?"
        )
    return torch.tensor([values[t] for t in text_ids])

"""The text-bias output format: written once, read and aligned by evaluation and the index."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from gpa_ray.bias_file import (
    BIAS_SCHEMA,
    BiasFileError,
    align_to_texts,
    bias_table,
    read_bias,
    write_bias,
)
from gpa_ray.sinkhorn import QBNormStats


def test_align_to_texts_names_missing_ids() -> None:
    table = pa.table({"text_id": ["a#0", "b#0"], "bias": [0.5, -0.5]})
    assert align_to_texts(table, "bias", ["b#0", "a#0"]).tolist() == [-0.5, 0.5]
    with pytest.raises(BiasFileError, match=r"covers 1 of the 2 texts .*'c#0'"):
        align_to_texts(table, "bias", ["a#0", "c#0"])


def test_write_then_read_round_trip(tmp_path: Path) -> None:
    captions = pa.table(
        {"text_id": ["c#0", "c#1"], "clip_id": ["c", "c"], "caption": ["a dog", "a bark"]}
    )
    stats = QBNormStats(torch.tensor([1.5, 0.25]), torch.tensor([True, False]))
    table = bias_table(captions, torch.tensor([0.125, -0.125]), stats)
    assert table.schema == BIAS_SCHEMA
    write_bias(str(tmp_path), table, {"G": 3, "J": 2})
    back, metadata = read_bias(str(tmp_path))
    assert back.equals(table) and metadata == {"G": 3, "J": 2}
    assert align_to_texts(back, "qb_active", ["c#1", "c#0"]).tolist() == [False, True]
    with pytest.raises(BiasFileError, match="run jobs/sinkhorn_bias.py"):
        read_bias(str(tmp_path / "missing"))

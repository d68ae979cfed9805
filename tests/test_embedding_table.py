"""Embeddings <-> Arrow: one layout for the bias job's query blocks and the index shards."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from gpa_ray.embedding_table import (
    DTYPES,
    embedding_columns,
    embedding_table,
    embeddings_from_table,
)
from gpa_ray.models.gpa import Embeddings
from gpa_ray.testing.synthetic import random_unit_embeddings


def test_embedding_table_round_trip() -> None:
    emb = random_unit_embeddings(5)
    table = embedding_table(list("abcde"), "clip_id", emb)
    back = embeddings_from_table(table)
    assert table.column("clip_id").to_pylist() == list("abcde")
    assert torch.equal(back.global_, emb.global_)
    assert torch.equal(back.prototypes, emb.prototypes)
    dp = embeddings_from_table(embedding_table(["x"], "text_id", Embeddings(emb.global_[:1])))
    assert dp.prototypes is None and torch.equal(dp.global_, emb.global_[:1])


def test_embeddings_from_chunked_and_sliced_tables() -> None:
    """What a bias actor gets: several object-store blocks, possibly slices of blocks."""
    emb = random_unit_embeddings(7)
    first = embedding_table(list("abcd"), "clip_id", emb[:4])
    second = embedding_table(list("efg"), "clip_id", emb[4:])
    table = pa.concat_tables([first.slice(1), second.slice(0, 2)])
    assert table.column("global").num_chunks == 2
    back = embeddings_from_table(table)
    assert table.column("clip_id").to_pylist() == list("bcdef")
    assert torch.equal(back.global_, emb.global_[1:6])
    assert torch.equal(back.prototypes, emb.prototypes[1:6])
    back.global_.add_(1.0)  # owned, writable memory, not the Arrow buffers
    assert torch.equal(embeddings_from_table(table).global_, emb.global_[1:6])


@pytest.mark.parametrize("dtype", sorted(DTYPES))
def test_stored_dtype_and_empty_tables(dtype: str) -> None:
    emb = random_unit_embeddings(3, dim=8, n_prototypes=2)
    columns = embedding_columns(emb, dtype)
    assert columns["global"].type == pa.list_(DTYPES[dtype], 8)
    assert columns["prototypes"].type == pa.list_(DTYPES[dtype], 16)
    back = embeddings_from_table(pa.table(columns))
    assert back.global_.dtype == torch.float32
    torch.testing.assert_close(back.prototypes, emb.prototypes, atol=1e-3, rtol=0)
    empty = embeddings_from_table(pa.table(columns).slice(0, 0))
    assert empty.global_.shape == (0, 8) and empty.prototypes.shape == (0, 2, 8)
    with pytest.raises(ValueError, match="float16"):
        embedding_columns(emb, "int8")

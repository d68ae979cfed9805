"""Embeddings <-> Arrow: the one columnar layout of global and prototype embeddings.

Every table that stores GPA embeddings (the bias job's query blocks, an index version's
clips and texts) keeps them the same way: `global` as a fixed-size list [E] and, when the
model has prototypes, `prototypes` as a fixed-size list [(K+1) * E] in row-major order,
both float16 or float32. Any reader turns them back into float32 tensors with
`embeddings_from_table`, whatever the stored dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch

from gpa_ray.models.gpa import Embeddings

DTYPES = {"float16": pa.float16(), "float32": pa.float32()}
VECTOR_COLUMNS = ("global", "prototypes")


def vector_column(values: torch.Tensor, dtype: str = "float32") -> pa.FixedSizeListArray:
    """[N, ...] float tensor -> fixed-size list column of its flattened rows in `dtype`."""
    if dtype not in DTYPES:
        raise ValueError(f"embedding dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    width = math.prod(values.shape[1:])
    array = values.detach().to("cpu", torch.float32).reshape(values.shape[0], width).numpy()
    flat = pa.array(array.astype(np.dtype(dtype)).reshape(-1), type=DTYPES[dtype])
    return pa.FixedSizeListArray.from_arrays(flat, width)


def embedding_columns(emb: Embeddings, dtype: str = "float32") -> dict[str, pa.Array]:
    """`global` and (if any) `prototypes` columns of `emb`."""
    columns = {"global": vector_column(emb.global_, dtype)}
    if emb.prototypes is not None:
        columns["prototypes"] = vector_column(emb.prototypes, dtype)
    return columns


def embedding_table(
    ids: Sequence[str], id_column: str, emb: Embeddings, dtype: str = "float32"
) -> pa.Table:
    """Ids plus the embedding columns: what an embedding actor hands back to Ray Data."""
    return pa.table({id_column: pa.array(list(ids), pa.string()), **embedding_columns(emb, dtype)})


def fixed_size_matrix(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
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


def embeddings_from_table(table: pa.Table) -> Embeddings:
    """Inverse of `embedding_columns`: float32 Embeddings in the table's row order."""
    global_ = torch.from_numpy(fixed_size_matrix(table.column("global")))
    if "prototypes" not in table.column_names:
        return Embeddings(global_)
    flat = torch.from_numpy(fixed_size_matrix(table.column("prototypes")))
    dim = global_.shape[1]
    return Embeddings(global_, flat.reshape(table.num_rows, flat.shape[1] // dim, dim))

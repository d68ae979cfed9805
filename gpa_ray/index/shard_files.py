"""The served layout of an index version: S shards of memory-mappable search files.

The build's unit shards (`clips/`, `texts/` parquet) are the durable record a version is
committed and resumed from; before the manifest is written they are reorganised, in one
streaming pass, into what a searcher maps:

    search/shard-SSS/clips.faiss            stage-1 ANN of the clips (`gpa_ray.index.ann`)
    search/shard-SSS/clips_global.npy       [n, E], read by row in stage 2
    search/shard-SSS/clips_prototypes.npy   [n, K+1, E] (models with prototypes)
    search/shard-SSS/clips_meta.arrow       Arrow IPC file: metadata, one row per clip
    search/shard-SSS/texts.*                the same for captions (+ `bias` in the meta)

Clip rows are segments (`segment_id`: the clip id for segment 0, so a clip of one
segment keeps its id). A clip belongs to shard crc32(clip_id) mod S, and its segments
and captions go with it, so a caption's clip metadata is always in the caption's shard.
Rows of a shard are sorted by id: a row is found by binary search over the Arrow id
column, and ties in any ranking are broken by id, which is the same rule whatever S
is. Stage-1 vectors of texts carry the Sinkhorn bias as one more dimension
(`gpa_ray.index.search`). Vectors keep the version's dtype (`index.dtype`, float16 by
default).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from gpa_ray import storage
from gpa_ray.config import StorageConfig
from gpa_ray.index import ann

SIDES = ("clips", "texts")
ID_COLUMN = {"clips": "segment_id", "texts": "text_id"}
CHUNK_ROWS = 65_536
CLIP_FIELDS_ON_TEXTS = ("corpus", "split", "duration_s", "labels", "has_audio")
"""Clip metadata copied onto each caption row, so filters and results need no other shard."""


def shard_dir(version_dir: str, shard: int) -> str:
    return storage.join(version_dir, "search", f"shard-{shard:03d}")


def side_files(side: str, with_prototypes: bool) -> dict[str, str]:
    """File names of one side of a shard, by role."""
    files = {"ann": f"{side}.faiss", "global": f"{side}_global.npy", "meta": f"{side}_meta.arrow"}
    if with_prototypes:
        files["prototypes"] = f"{side}_prototypes.npy"
    return files


def shard_of(clip_ids: Sequence[str], n_shards: int) -> np.ndarray:
    """The shard of each clip: crc32 of its id, mod S (stable across processes and runs)."""
    return np.fromiter(
        (zlib.crc32(c.encode()) % n_shards for c in clip_ids), np.int64, len(clip_ids)
    )


@dataclass
class _SidePlan:
    """Where every row of one side (its unit files concatenated) goes: shard and slot."""

    offsets: np.ndarray
    shard: np.ndarray
    slot: np.ndarray
    counts: list[int]

    @classmethod
    def make(cls, ids: pa.ChunkedArray, clip_ids: pa.ChunkedArray, n_shards: int) -> _SidePlan:
        lengths = [len(c) for c in ids.chunks]
        shard = shard_of(clip_ids.to_pylist(), n_shards)
        slot = np.zeros(len(shard), np.int64)
        counts = []
        flat = pa.concat_arrays(ids.chunks) if ids.num_chunks else pa.array([], pa.string())
        for s in range(n_shards):
            rows = np.nonzero(shard == s)[0]
            order = pc.sort_indices(flat.take(pa.array(rows))).to_numpy()
            slot[rows[order]] = np.arange(len(rows))
            counts.append(len(rows))
        return cls(np.cumsum([0, *lengths]), shard, slot, counts)

    def unit_rows(self, unit: int) -> tuple[np.ndarray, np.ndarray]:
        start, stop = self.offsets[unit], self.offsets[unit + 1]
        return self.shard[start:stop], self.slot[start:stop]


def _read(uri: str, columns: list[str], storage_cfg: StorageConfig | None) -> pa.Table:
    fs, path = storage.resolve(uri, storage_cfg)
    return pq.read_table(path, filesystem=fs, columns=columns)


def _vectors(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column).combine_chunks()
    return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), col.type.list_size)


class _Staging:
    """Local files of one side's shards while they are written (final names): vector
    memmaps filled in place, and metadata pieces tagged with their slot."""

    def __init__(
        self, root: str, side: str, counts: list[int], shapes: tuple[int, int, np.dtype]
    ) -> None:
        dim, n_protos, self.dtype = shapes
        self.root = root
        self.names = side_files(side, bool(n_protos))
        self.global_: list[np.memmap] = []
        self.prototypes: list[np.memmap] = []
        self.pieces: list[list[pa.Table]] = [[] for _ in counts]
        for s, n in enumerate(counts):
            os.makedirs(self.dir(s), exist_ok=True)
            self.global_.append(self._memmap(s, "global", (n, dim)))
            if n_protos:
                self.prototypes.append(self._memmap(s, "prototypes", (n, n_protos, dim)))

    def dir(self, shard: int) -> str:
        return os.path.join(self.root, f"shard-{shard:03d}")

    def path(self, shard: int, role: str) -> str:
        return os.path.join(self.dir(shard), self.names[role])

    def _memmap(self, shard: int, role: str, shape: tuple[int, ...]) -> np.memmap:
        return np.lib.format.open_memmap(
            self.path(shard, role), mode="w+", dtype=self.dtype, shape=shape
        )

    def upload(self, shard: int, version_dir: str, storage_cfg: StorageConfig | None) -> None:
        self.global_[shard].flush()
        if self.prototypes:
            self.prototypes[shard].flush()
        for role, name in self.names.items():
            target = storage.join(shard_dir(version_dir, shard), name)
            storage.copy_file(self.path(shard, role), target, storage_cfg)


def _stage_side(
    side: str,
    files: Sequence[str],
    columns: list[str],
    plan: _SidePlan,
    staging: _Staging,
    storage_cfg: StorageConfig | None,
    clip_files: Sequence[str] = (),
) -> None:
    """Stream one side's unit files into the staging shards (vectors in place, metadata
    pieces tagged with their slot)."""
    protos = bool(staging.prototypes)
    vector_cols = ["global", "prototypes"] if protos else ["global"]
    for unit, uri in enumerate(files):
        table = _read(uri, [*columns, *vector_cols], storage_cfg)
        if side == "clips":
            table = _clip_meta(table, unit)
        else:
            clips = _clip_meta(_read(clip_files[unit], _CLIP_READ, storage_cfg), unit)
            table = _with_clip_fields(table, clips)
        shard, slot = plan.unit_rows(unit)
        glob = _vectors(table, "global")
        proto = _vectors(table, "prototypes") if protos else None
        meta = table.drop_columns(vector_cols)
        for s in range(len(plan.counts)):  # every shard gets a piece: its schema, if empty
            mask = shard == s
            slots = slot[mask]
            staging.global_[s][slots] = glob[mask]
            if proto is not None:
                staging.prototypes[s][slots] = proto[mask].reshape(
                    staging.prototypes[s][slots].shape
                )
            piece = meta.filter(pa.array(mask)).append_column("_slot", pa.array(slots))
            staging.pieces[s].append(piece)


_CLIP_META = [
    "clip_id",
    "segment_id",
    "segment",
    "segment_start_s",
    "segment_end_s",
    "corpus",
    "split",
    "duration_s",
    "captions",
    "labels",
    "content_digest",
]
_CLIP_READ = [*_CLIP_META, "audio_sample_rate"]
_TEXT_META = ["text_id", "clip_id", "caption_index", "text"]


def _clip_meta(table: pa.Table, unit: int) -> pa.Table:
    """Segment rows as a searcher keeps them: where the clip's audio is (the row of its
    segment 0, which precedes its other segments in the unit), instead of the audio."""
    audio_row = np.arange(table.num_rows, dtype=np.int32)
    audio_row -= table.column("segment").to_numpy().astype(np.int32)
    has_audio = pc.is_valid(table.column("audio_sample_rate")).to_numpy(False)[audio_row]
    return (
        table.drop_columns(["audio_sample_rate"])
        .append_column("has_audio", pa.array(has_audio))
        .append_column("audio_file", pa.array(np.full(table.num_rows, unit, np.int32)))
        .append_column("audio_row", pa.array(audio_row))
    )


def _with_clip_fields(texts: pa.Table, clips: pa.Table) -> pa.Table:
    where = pc.index_in(texts.column("clip_id"), value_set=clips.column("clip_id"))
    for name in CLIP_FIELDS_ON_TEXTS:
        texts = texts.append_column(name, clips.column(name).take(where))
    return texts


def _finish_meta(
    staging: _Staging, shard: int, bias: pa.Table | None
) -> tuple[pa.Table, np.ndarray | None]:
    """The shard's metadata in slot order (and, for texts with a bias, each row's bias)."""
    table = pa.concat_tables(staging.pieces[shard])
    table = table.take(pc.sort_indices(table.column("_slot"))).drop_columns(["_slot"])
    values = None
    if bias is not None:
        where = pc.index_in(table.column("text_id"), value_set=bias.column("text_id"))
        if where.null_count:
            raise ValueError(f"the text bias lacks {where.null_count} indexed captions")
        values = bias.column("bias").take(where).to_numpy().astype(np.float32)
        table = table.append_column("bias", pa.array(values))
    return table, values


def _write_ipc(table: pa.Table, path: str) -> None:
    with pa.OSFile(path, "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def _stage1_chunks(global_: np.ndarray, bias: np.ndarray | None) -> Iterator[np.ndarray]:
    for start in range(0, len(global_), CHUNK_ROWS):
        chunk = np.asarray(global_[start : start + CHUNK_ROWS], np.float32)
        if bias is not None:
            chunk = np.hstack([chunk, bias[start : start + CHUNK_ROWS, None]])
        yield chunk


def _train_ann(
    plan: _SidePlan,
    staging: _Staging,
    biases: list[np.ndarray | None],
    dim: int,
    settings: ann.AnnSettings,
) -> Any:
    """The side's ANN trained once, on a sample drawn over all shards and laid out in
    unit order, so that any number of shards trains the very same lists and codes."""
    n_items = len(plan.shard)
    rows = ann.sample_rows(n_items, settings, dim)
    shard, slot = plan.shard[rows], plan.slot[rows]
    sample = np.zeros((len(rows), dim), np.float32)
    for s in range(len(plan.counts)):
        mine = shard == s
        vectors = np.asarray(staging.global_[s][slot[mine]], np.float32)
        if biases[s] is not None:
            vectors = np.hstack([vectors, biases[s][slot[mine], None]])
        sample[mine] = vectors
    return ann.train(sample, dim, n_items, settings)


def write_shards(
    version_dir: str,
    clip_files: Sequence[str],
    text_files: Sequence[str],
    *,
    n_shards: int,
    settings: ann.AnnSettings,
    bias: pa.Table | None = None,
    storage_cfg: StorageConfig | None = None,
) -> dict[str, Any]:
    """Write the search files of a version from its unit files (clip file i and text file
    i from the same unit); the manifest's `search` section describing them."""
    if n_shards < 1:
        raise ValueError(f"index.shards must be >= 1, got {n_shards}")
    clip_uris = [storage.join(version_dir, f) for f in clip_files]
    text_uris = [storage.join(version_dir, f) for f in text_files]
    fs, path = storage.resolve(clip_uris[0], storage_cfg)
    schema = pq.read_schema(path, filesystem=fs)
    dim = schema.field("global").type.list_size
    dtype = np.dtype(schema.field("global").type.value_type.to_pandas_dtype())
    n_protos = (
        schema.field("prototypes").type.list_size // dim if "prototypes" in schema.names else 0
    )
    section: dict[str, Any] = {
        "shards": n_shards,
        "ann": asdict(settings),
        "embed_dim": dim,
        "n_prototypes": n_protos,
        "bias": bias is not None,
    }
    for side, uris in (("clips", clip_uris), ("texts", text_uris)):
        columns = list(dict.fromkeys([ID_COLUMN[side], "clip_id"]))
        tables = [_read(u, columns, storage_cfg) for u in uris]
        ids = pa.chunked_array([t.column(ID_COLUMN[side]) for t in tables], pa.string())
        owners = pa.chunked_array([t.column("clip_id") for t in tables], pa.string())
        plan = _SidePlan.make(ids, owners, n_shards)
        section[side] = _write_side(
            side,
            uris,
            plan,
            (dim, n_protos, dtype),
            settings,
            bias if side == "texts" else None,
            version_dir,
            storage_cfg,
            clip_uris,
        )
    return section


def _write_side(
    side: str,
    uris: Sequence[str],
    plan: _SidePlan,
    shapes: tuple[int, int, np.dtype],
    settings: ann.AnnSettings,
    bias: pa.Table | None,
    version_dir: str,
    storage_cfg: StorageConfig | None,
    clip_uris: Sequence[str],
) -> dict[str, Any]:
    """Stage, index and upload every shard of one side; its part of the manifest."""
    dim, n_protos, _ = shapes
    columns = _CLIP_READ if side == "clips" else _TEXT_META
    stage1_dim = dim + (bias is not None)
    with tempfile.TemporaryDirectory(prefix=f"gpa-index-{side}-") as root:
        staging = _Staging(root, side, plan.counts, shapes)
        _stage_side(side, uris, columns, plan, staging, storage_cfg, clip_uris)
        biases: list[np.ndarray | None] = []
        for s in range(len(plan.counts)):
            meta, values = _finish_meta(staging, s, bias)
            _write_ipc(meta, staging.path(s, "meta"))
            biases.append(values)
        trained = _train_ann(plan, staging, biases, stage1_dim, settings)
        for s in range(len(plan.counts)):
            index = ann.fill(trained, _stage1_chunks(staging.global_[s], biases[s]))
            ann.write(index, staging.path(s, "ann"))
            staging.upload(s, version_dir, storage_cfg)
    return {
        "counts": plan.counts,
        "stage1_dim": stage1_dim,
        "nlist": settings.lists_for(len(plan.shard), stage1_dim),
    }

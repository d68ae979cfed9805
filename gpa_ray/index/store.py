"""On-disk format of a retrieval index, and loading one version back into memory.

An index root (local folder or `s3://` prefix) holds immutable *versions*; the file
`LATEST` names the version to serve. A version folder holds:

    manifest.json             written last: a version without it is incomplete
    build.json                the build settings a resumed build must match
    _commits/unit-N.json      one marker per committed work unit (counts, failures)
    clips/part-N.parquet      one row per clip: metadata, `global` [E], `prototypes`
                              [(K+1) * E] (row-major), optional FLAC `audio`
    texts/part-N.parquet      one row per caption: `text_id`, `clip_id`, `text`, vectors
    text_bias.parquet         optional Sinkhorn text bias (`text_id`, `bias`)

Vectors are fixed-size lists of float16 or float32 (`index.dtype`); search always
computes in float32. Row groups are small so the audio of one clip is read without
reading its whole shard. The manifest lists every shard, so a reader never picks up a
stray or uncommitted file.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import io
import json
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from gpa_ray import storage
from gpa_ray.bias_file import BiasFileError, align_to_texts
from gpa_ray.config import StorageConfig
from gpa_ray.data.schema import CLIP_SCHEMA, MANIFEST_SCHEMA, text_id
from gpa_ray.embedding_table import VECTOR_COLUMNS, embedding_columns, embeddings_from_table
from gpa_ray.models.gpa import Embeddings

FORMAT_VERSION = 1
ROW_GROUP_SIZE = 64
"""Rows per parquet row group: reading one clip's audio reads at most this many rows."""

CLIP_META_FIELDS = [CLIP_SCHEMA.field(name) for name in MANIFEST_SCHEMA.names]
"""A clip's metadata as its clip shard holds it (the manifest columns, decoded duration)."""
TEXT_META_FIELDS = [
    pa.field("text_id", pa.string(), nullable=False),
    pa.field("clip_id", pa.string(), nullable=False),
    pa.field("caption_index", pa.int32(), nullable=False),
    pa.field("text", pa.string(), nullable=False),
]
AUDIO_FIELDS = [CLIP_SCHEMA.field("audio"), CLIP_SCHEMA.field("audio_sample_rate")]


class IndexFormatError(LookupError):
    """An index URI holds no loadable version, or a version is inconsistent."""


@dataclass(frozen=True)
class IndexLayout:
    """Where every file of one version lives under an index root."""

    root: str
    version: str

    @property
    def dir(self) -> str:
        return storage.join(self.root, self.version)

    @property
    def manifest(self) -> str:
        return storage.join(self.dir, "manifest.json")

    @property
    def build_settings(self) -> str:
        return storage.join(self.dir, "build.json")

    @property
    def commits_dir(self) -> str:
        return storage.join(self.dir, "_commits")

    @property
    def bias_file(self) -> str:
        return storage.join(self.dir, "text_bias.parquet")

    @property
    def latest(self) -> str:
        return latest_uri(self.root)

    def clips_file(self, unit: int) -> str:
        return storage.join(self.dir, self.clips_name(unit))

    def texts_file(self, unit: int) -> str:
        return storage.join(self.dir, self.texts_name(unit))

    def commit_marker(self, unit: int) -> str:
        return storage.join(self.commits_dir, f"unit-{unit:06d}.json")

    @staticmethod
    def clips_name(unit: int) -> str:
        return f"clips/part-{unit:06d}.parquet"

    @staticmethod
    def texts_name(unit: int) -> str:
        return f"texts/part-{unit:06d}.parquet"


def latest_uri(root: str) -> str:
    return storage.join(root, "LATEST")


@dataclass(frozen=True)
class IndexManifest:
    """What a complete index version holds; `n_prototypes` is K+1 (0: global only)."""

    version: str
    created_at: str
    checkpoint: str
    embed_dim: int
    n_prototypes: int
    dtype: str
    n_clips: int
    n_texts: int
    clips_with_audio: int
    clip_files: list[str]
    text_files: list[str]
    source: str = ""
    splits: list[str] = field(default_factory=list)
    bias: dict[str, Any] | None = None
    build: dict[str, Any] = field(default_factory=dict)
    # SHA-256 of the checkpoint's model.pt (`checkpoints.weights_digest`): what Serve
    # compares before answering with this version (empty: written without one).
    checkpoint_digest: str = ""
    format: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes) -> IndexManifest:
        raw = json.loads(data)
        if raw.get("format") != FORMAT_VERSION:
            raise IndexFormatError(f"index format {raw.get('format')!r} is not {FORMAT_VERSION}")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in names})

    def summary(self) -> dict[str, Any]:
        """The manifest without file lists (what a health check shows)."""
        out = dataclasses.asdict(self)
        del out["clip_files"], out["text_files"]
        return out


# --------------------------------------------------------------------------- writing


def _table(
    meta_fields: list[pa.Field], rows: Sequence[dict[str, Any]], emb: Embeddings, dtype: str
) -> pa.Table:
    if len(rows) != len(emb):
        raise ValueError(f"{len(rows)} rows but {len(emb)} embeddings")
    arrays = {f.name: pa.array([r.get(f.name) for r in rows], type=f.type) for f in meta_fields}
    arrays.update(embedding_columns(emb, dtype))
    fields = [
        *meta_fields,
        *(pa.field(n, a.type, nullable=False) for n, a in arrays.items() if n in VECTOR_COLUMNS),
    ]
    return pa.Table.from_arrays([arrays[f.name] for f in fields], schema=pa.schema(fields))


def index_clips_table(
    rows: Sequence[dict[str, Any]], emb: Embeddings, dtype: str, store_audio: bool
) -> pa.Table:
    """Index rows of clips: metadata (clip shard columns), vectors, and FLAC audio if kept."""
    table = _table(CLIP_META_FIELDS, rows, emb, dtype)
    for f in AUDIO_FIELDS:
        values = [r.get(f.name) if store_audio else None for r in rows]
        table = table.append_column(f, pa.array(values, type=f.type))
    return table


def index_texts_table(rows: Sequence[dict[str, Any]], emb: Embeddings, dtype: str) -> pa.Table:
    """Index rows of captions: `text_id`, `clip_id`, `caption_index`, `text`, vectors."""
    return _table(TEXT_META_FIELDS, rows, emb, dtype)


def caption_rows(clips: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One text row per caption of every clip, in clip order."""
    return [
        {
            "text_id": text_id(c["clip_id"], i),
            "clip_id": c["clip_id"],
            "caption_index": i,
            "text": caption,
        }
        for c in clips
        for i, caption in enumerate(c["captions"])
    ]


def write_table(uri: str, table: pa.Table, storage_cfg: StorageConfig | None = None) -> None:
    """Write one shard atomically with small row groups."""
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", row_group_size=ROW_GROUP_SIZE)
    storage.write_bytes(uri, sink.getvalue(), storage_cfg)


def write_manifest(
    root: str, manifest: IndexManifest, storage_cfg: StorageConfig | None = None
) -> None:
    """Commit a version (its manifest), then point LATEST at it."""
    layout = IndexLayout(root, manifest.version)
    storage.write_bytes(layout.manifest, manifest.to_json(), storage_cfg)
    pointer = {"version": manifest.version, "created_at": manifest.created_at}
    storage.write_bytes(layout.latest, json.dumps(pointer).encode(), storage_cfg)


# --------------------------------------------------------------------------- reading


def resolve_version(uri: str, storage_cfg: StorageConfig | None = None) -> IndexLayout:
    """The version an index URI names: a version folder itself, or its root's LATEST."""
    uri = uri.rstrip("/")
    if storage.exists(storage.join(uri, "manifest.json"), storage_cfg):
        root, _, version = uri.rpartition("/")
        return IndexLayout(root, version)
    pointer = latest_uri(uri)
    if not storage.exists(pointer, storage_cfg):
        raise IndexFormatError(
            f"no index at {uri}: neither {uri}/manifest.json nor {pointer} exists"
        )
    version = json.loads(storage.read_bytes(pointer, storage_cfg))["version"]
    layout = IndexLayout(uri, version)
    if not storage.exists(layout.manifest, storage_cfg):
        raise IndexFormatError(f"{pointer} names version {version!r}, which has no manifest")
    return layout


def read_manifest(layout: IndexLayout, storage_cfg: StorageConfig | None = None) -> IndexManifest:
    return IndexManifest.from_json(storage.read_bytes(layout.manifest, storage_cfg))


def _read_tables(
    uris: Sequence[str], columns: list[str], storage_cfg: StorageConfig | None
) -> list[pa.Table]:
    def read(uri: str) -> pa.Table:
        fs, path = storage.resolve(uri, storage_cfg)
        return pq.read_table(path, filesystem=fs, columns=columns)

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(read, uris))


@dataclass
class IndexSide:
    """One side of an index in memory: float32 embeddings, ids, metadata rows by position."""

    ids: list[str]
    embeddings: Embeddings
    metadata: list[dict[str, Any]]
    positions: dict[str, int]

    def __len__(self) -> int:
        return len(self.ids)


def _side(tables: list[pa.Table], id_column: str, manifest: IndexManifest) -> IndexSide:
    if not tables:
        e, p = manifest.embed_dim, manifest.n_prototypes
        empty = Embeddings(torch.zeros(0, e), torch.zeros(0, p, e) if p else None)
        return IndexSide([], empty, [], {})
    table = pa.concat_tables(tables)
    meta_columns = [c for c in table.column_names if c not in VECTOR_COLUMNS]
    metadata = table.select(meta_columns).to_pylist()
    ids = [row[id_column] for row in metadata]
    positions = {i: n for n, i in enumerate(ids)}
    if len(positions) != len(ids):
        raise IndexFormatError(f"index version {manifest.version} has duplicate {id_column}s")
    return IndexSide(ids, embeddings_from_table(table), metadata, positions)


class LoadedIndex:
    """One index version in memory: clips, texts, the optional text bias, and lazy access
    to stored clip audio (read from its shard's row group on demand, never held)."""

    def __init__(
        self,
        layout: IndexLayout,
        manifest: IndexManifest,
        clips: IndexSide,
        texts: IndexSide,
        text_bias: torch.Tensor | None,
        clip_file_rows: Sequence[int],
        storage_cfg: StorageConfig | None = None,
    ) -> None:
        self.layout = layout
        self.manifest = manifest
        self.clips = clips
        self.texts = texts
        self.text_bias = text_bias
        self._file_starts = np.cumsum([0, *clip_file_rows])[:-1].tolist()
        self._storage_cfg = storage_cfg
        self._lock = threading.Lock()
        self._parquet: dict[int, pq.ParquetFile] = {}

    @property
    def version(self) -> str:
        return self.manifest.version

    def _shard(self, file_index: int) -> pq.ParquetFile:
        pf = self._parquet.get(file_index)
        if pf is None:
            uri = storage.join(self.layout.dir, self.manifest.clip_files[file_index])
            fs, path = storage.resolve(uri, self._storage_cfg)
            pf = pq.ParquetFile(fs.open_input_file(path))
            self._parquet[file_index] = pf
        return pf

    def clip_audio(self, clip_id: str) -> tuple[bytes, int] | None:
        """(FLAC bytes, sample rate) of a clip, or None if unknown or stored without audio."""
        pos = self.clips.positions.get(clip_id)
        if pos is None or not self.clips.metadata[pos]["has_audio"]:
            return None
        file_index = bisect.bisect_right(self._file_starts, pos) - 1
        row = pos - self._file_starts[file_index]
        with self._lock:
            pf = self._shard(file_index)
            group = 0
            while row >= pf.metadata.row_group(group).num_rows:
                row -= pf.metadata.row_group(group).num_rows
                group += 1
            table = pf.read_row_group(group, columns=["audio", "audio_sample_rate"])
        record = table.slice(row, 1).to_pylist()[0]
        return record["audio"], int(record["audio_sample_rate"])


CLIP_LOAD_COLUMNS = [
    "clip_id",
    "corpus",
    "split",
    "duration_s",
    "captions",
    "labels",
    "audio_sample_rate",
    "global",
    "prototypes",
]


def load_index(uri: str, storage_cfg: StorageConfig | None = None) -> LoadedIndex:
    """Load the version an index URI names (see `resolve_version`) into memory."""
    layout = resolve_version(uri, storage_cfg)
    manifest = read_manifest(layout, storage_cfg)
    vector_cols = ["global", "prototypes"] if manifest.n_prototypes else ["global"]
    clip_uris = [storage.join(layout.dir, name) for name in manifest.clip_files]
    text_uris = [storage.join(layout.dir, name) for name in manifest.text_files]
    clip_cols = [c for c in CLIP_LOAD_COLUMNS if c != "prototypes" or manifest.n_prototypes]
    clip_tables = _read_tables(clip_uris, clip_cols, storage_cfg)
    text_tables = _read_tables(
        text_uris, [f.name for f in TEXT_META_FIELDS] + vector_cols, storage_cfg
    )
    clip_tables = [
        t.drop_columns(["audio_sample_rate"]).append_column(
            "has_audio", pc.is_valid(t.column("audio_sample_rate"))
        )
        for t in clip_tables
    ]
    clips = _side(clip_tables, "clip_id", manifest)
    texts = _side(text_tables, "text_id", manifest)
    if (len(clips), len(texts)) != (manifest.n_clips, manifest.n_texts):
        raise IndexFormatError(
            f"index version {manifest.version}: manifest counts {manifest.n_clips} clips and "
            f"{manifest.n_texts} texts, shards hold {len(clips)} and {len(texts)}"
        )
    bias = None
    if manifest.bias is not None:
        bias = align_bias(storage.read_parquet(layout.bias_file, storage_cfg), texts.ids).float()
    file_rows = [t.num_rows for t in clip_tables]
    return LoadedIndex(layout, manifest, clips, texts, bias, file_rows, storage_cfg)


def align_bias(bias_table: pa.Table, text_ids: Sequence[str]) -> torch.Tensor:
    """The bias of every index text in `text_ids` order (`bias_file.align_to_texts`); a text
    without one makes the version inconsistent."""
    try:
        return align_to_texts(bias_table, "bias", text_ids)
    except BiasFileError as exc:
        raise IndexFormatError(f"index text bias: {exc}") from exc


def utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def write_bias(
    layout: IndexLayout,
    text_ids: Sequence[str],
    bias_table: pa.Table,
    storage_cfg: StorageConfig | None = None,
) -> None:
    """Store the bias of exactly the index's texts (checked to cover all of them)."""
    bias = align_bias(bias_table, text_ids)
    table = pa.table({"text_id": pa.array(list(text_ids)), "bias": pa.array(bias.numpy())})
    storage.write_parquet(layout.bias_file, table, storage_cfg)


def write_version(
    root: str,
    version: str,
    clips: Sequence[dict[str, Any]],
    clip_emb: Embeddings,
    text_emb: Embeddings,
    *,
    checkpoint: str,
    checkpoint_digest: str = "",
    dtype: str = "float16",
    store_audio: bool = True,
    bias: pa.Table | None = None,
    bias_info: dict[str, Any] | None = None,
    storage_cfg: StorageConfig | None = None,
) -> IndexManifest:
    """Write a whole version from embeddings already in memory, as one shard per side.

    `clips` are clip-shard rows; `text_emb` holds one row per caption in
    `caption_rows(clips)` order; `bias` a (`text_id`, `bias`) table covering every caption,
    `bias_info` its provenance. (The Ray build writes the same files unit by unit.)
    """
    layout = IndexLayout(root, version)
    texts = caption_rows(clips)
    clip_table = index_clips_table(clips, clip_emb, dtype, store_audio)
    write_table(layout.clips_file(0), clip_table, storage_cfg)
    write_table(layout.texts_file(0), index_texts_table(texts, text_emb, dtype), storage_cfg)
    if bias is not None:
        write_bias(layout, [t["text_id"] for t in texts], bias, storage_cfg)
        bias_info = bias_info or {}
    else:
        bias_info = None
    manifest = IndexManifest(
        version=version,
        created_at=utc_now(),
        checkpoint=checkpoint,
        checkpoint_digest=checkpoint_digest,
        embed_dim=int(clip_emb.global_.shape[1]),
        n_prototypes=0 if clip_emb.prototypes is None else int(clip_emb.prototypes.shape[1]),
        dtype=dtype,
        n_clips=len(clips),
        n_texts=len(texts),
        clips_with_audio=int(pc.sum(pc.is_valid(clip_table.column("audio"))).as_py() or 0),
        clip_files=[layout.clips_name(0)],
        text_files=[layout.texts_name(0)],
        bias=bias_info,
    )
    write_manifest(root, manifest, storage_cfg)
    return manifest

"""On-disk format of a retrieval index, and loading one version back into memory.

An index root (local folder or `s3://` prefix) holds immutable *versions*; the file
`LATEST` names the version to serve. A version folder holds:

    manifest.json             written last: a version without it is incomplete
    build.json                the build settings a resumed build must match
    _commits/unit-N.json      one marker per committed work unit (counts, failures)
    clips/part-N.parquet      one row per segment (a clip, or one window of a long
                              file): metadata, `segment_id`, `segment`, its start and
                              end, `global` [E], `prototypes` [(K+1) * E] (row-major),
                              optional FLAC `audio` (on segment 0)
    texts/part-N.parquet      one row per caption: `text_id`, `clip_id`, `text`, vectors
    text_bias.parquet         optional Sinkhorn text bias (`text_id`, `bias`)

Vectors are fixed-size lists of float16 or float32 (`index.dtype`); search always
computes in float32. Row groups are small so the audio of one clip is read without
reading its whole shard. The manifest lists every shard, so a reader never picks up a
stray or uncommitted file.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import io
import json
from collections.abc import Sequence
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
from gpa_ray.embedding_table import VECTOR_COLUMNS, embedding_columns
from gpa_ray.index.ann import AnnSettings
from gpa_ray.index.shard_files import write_shards
from gpa_ray.models.gpa import Embeddings

FORMAT_VERSION = 3
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
SEGMENT_FIELDS = [
    pa.field("segment_id", pa.string(), nullable=False),
    pa.field("segment", pa.int32(), nullable=False),
    pa.field("segment_start_s", pa.float32(), nullable=False),
    pa.field("segment_end_s", pa.float32(), nullable=False),
]
"""Where in its file an index row's audio lies: a clip is one row (segment 0, the clip's
span), a long file embedded as windows one row per window (`index.segments`)."""
AUDIO_FIELDS = [CLIP_SCHEMA.field("audio"), CLIP_SCHEMA.field("audio_sample_rate")]
CONTENT_DIGEST = pa.field("content_digest", pa.string(), nullable=False)


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
    # The served layout (`gpa_ray.index.shard_files.write_shards`): shards, ANN, counts.
    search: dict[str, Any] = field(default_factory=dict)
    # Long files as windows: {"window_s", "hop_s", "n_segments"} (empty: one row a clip).
    segments: dict[str, Any] = field(default_factory=dict)
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


def content_digest(row: dict[str, Any]) -> str:
    """SHA-256 of what a clip's embeddings depend on: its audio (or codes) and captions. An
    incremental build reuses a clip's embeddings only while this is unchanged."""
    digest = hashlib.sha256()
    audio = row.get("audio")
    digest.update(audio if audio is not None else json.dumps(row.get("codes")).encode())
    digest.update(json.dumps(list(row.get("captions") or [])).encode())
    return digest.hexdigest()


def segment_id(clip_id: str, segment: int) -> str:
    """A segment's id: the clip id for segment 0 (so a clip of one segment keeps its
    id), `<clip_id>@<segment>` for the others."""
    return clip_id if segment == 0 else f"{clip_id}@{segment}"


def segment_fields(row: dict[str, Any]) -> dict[str, Any]:
    """A row's segment columns; a row without them is its clip's one segment, its span
    the clip's."""
    segment = int(row.get("segment", 0))
    return {
        "segment_id": segment_id(row["clip_id"], segment),
        "segment": segment,
        "segment_start_s": float(row.get("segment_start_s", 0.0)),
        "segment_end_s": float(row.get("segment_end_s", row.get("duration_s") or 0.0)),
    }


def index_clips_table(
    rows: Sequence[dict[str, Any]], emb: Embeddings, dtype: str, store_audio: bool
) -> pa.Table:
    """Index rows of segments (clip rows, with `segment`, `segment_start_s`,
    `segment_end_s` for the windows of a long file; a clip's segments adjacent, segment
    0 first): metadata (clip shard columns), the segment columns, each clip's
    `content_digest`, vectors, and FLAC audio if kept (once per clip, on segment 0)."""
    table = _table(CLIP_META_FIELDS, rows, emb, dtype)
    segments = [segment_fields(r) for r in rows]
    for f in SEGMENT_FIELDS:
        table = table.append_column(f, pa.array([s[f.name] for s in segments], type=f.type))
    digests = [r.get("content_digest") or content_digest(r) for r in rows]
    table = table.append_column(CONTENT_DIGEST, pa.array(digests, pa.string()))
    for f in AUDIO_FIELDS:
        values = [
            r.get(f.name) if store_audio and s["segment"] == 0 else None
            for r, s in zip(rows, segments, strict=True)
        ]
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
) -> pa.Table:
    """Store the bias of exactly the index's texts (checked to cover all of them); the
    stored (`text_id`, `bias`) table."""
    bias = align_bias(bias_table, text_ids)
    table = pa.table({"text_id": pa.array(list(text_ids)), "bias": pa.array(bias.numpy())})
    storage.write_parquet(layout.bias_file, table, storage_cfg)
    return table


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
    units: int = 1,
    shards: int = 1,
    ann_settings: AnnSettings | None = None,
    storage_cfg: StorageConfig | None = None,
) -> IndexManifest:
    """Write a whole version from embeddings already in memory, in `units` unit files
    per side and `shards` search shards.

    `clips` are clip-shard rows; `text_emb` holds one row per caption in
    `caption_rows(clips)` order; `bias` a (`text_id`, `bias`) table covering every caption,
    `bias_info` its provenance. (The Ray build writes the same files unit by unit.)
    """
    layout = IndexLayout(root, version)
    texts = caption_rows(clips)
    bounds = np.linspace(0, len(clips), units + 1).astype(int)
    text_start, with_audio = 0, 0
    for unit, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        unit_clips = clips[start:stop]
        n_texts = sum(len(c["captions"]) for c in unit_clips)
        text_rows = slice(text_start, text_start + n_texts)
        text_start += n_texts
        clip_table = index_clips_table(unit_clips, clip_emb[start:stop], dtype, store_audio)
        with_audio += int(pc.sum(pc.is_valid(clip_table.column("audio"))).as_py() or 0)
        write_table(layout.clips_file(unit), clip_table, storage_cfg)
        text_table = index_texts_table(texts[text_rows], text_emb[text_rows], dtype)
        write_table(layout.texts_file(unit), text_table, storage_cfg)
    stored_bias = None
    if bias is not None:
        stored_bias = write_bias(layout, [t["text_id"] for t in texts], bias, storage_cfg)
        bias_info = bias_info or {}
    else:
        bias_info = None
    clip_files = [layout.clips_name(u) for u in range(units)]
    text_files = [layout.texts_name(u) for u in range(units)]
    search = write_shards(
        layout.dir,
        clip_files,
        text_files,
        n_shards=shards,
        settings=ann_settings or AnnSettings(),
        bias=stored_bias,
        storage_cfg=storage_cfg,
    )
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
        clips_with_audio=with_audio,
        clip_files=clip_files,
        text_files=text_files,
        bias=bias_info,
        search=search,
    )
    write_manifest(root, manifest, storage_cfg)
    return manifest

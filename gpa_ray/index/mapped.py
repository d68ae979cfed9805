"""One shard of an index version, memory-mapped for search (files of `shard_files`).

Nothing is copied into anonymous memory when a shard is opened: the ANN, the float16
vectors and the Arrow metadata are mapped from local files, so opening takes
milliseconds whatever N is, the kernel pages in what queries touch, replicas on one node
share those pages, and dropping the last reference unmaps them. A version on S3 is first
copied to a local cache folder (`serve.cache_dir`), once per node.
"""

from __future__ import annotations

import bisect
import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from gpa_ray import storage
from gpa_ray.config import StorageConfig
from gpa_ray.index import ann, shard_files
from gpa_ray.index.store import (
    IndexFormatError,
    IndexLayout,
    IndexManifest,
    read_manifest,
    resolve_version,
)
from gpa_ray.models.gpa import Embeddings

COMPLETE = ".complete"
CACHE_FOLDER = "gpa_ray-index-cache"
"""Default folder (under the temp folder) for local copies of shards read from S3."""


def local_shard_dir(
    layout: IndexLayout,
    manifest: IndexManifest,
    shard: int,
    cache_dir: str,
    storage_cfg: StorageConfig | None = None,
) -> str:
    """A local folder holding the shard's search files: the version's own folder when it
    is local, else a copy under `cache_dir` (made once; reused while complete)."""
    remote = shard_files.shard_dir(layout.dir, shard)
    if not storage.is_s3(remote):
        return storage.resolve(remote)[1]
    local = os.path.join(_cached_version(cache_dir, layout.dir), f"shard-{shard:03d}")
    if os.path.exists(os.path.join(local, COMPLETE)):
        return local
    protos = bool(manifest.n_prototypes)
    for side in shard_files.SIDES:
        for name in shard_files.side_files(side, protos).values():
            storage.copy_file(storage.join(remote, name), os.path.join(local, name), storage_cfg)
    open(os.path.join(local, COMPLETE), "w").close()
    return local


def cache_root(cache_dir: str) -> str:
    """`cache_dir`, or the default folder under the temp folder when it is empty."""
    return cache_dir or os.path.join(tempfile.gettempdir(), CACHE_FOLDER)


def _cached_version(cache_dir: str, version_dir: str) -> str:
    """A version's folder in the cache: its name and a hash of its URI (two indexes may
    both have a version "v1")."""
    key = hashlib.sha256(version_dir.encode()).hexdigest()[:16]
    return os.path.join(cache_root(cache_dir), f"{os.path.basename(version_dir)}-{key}")


def drop_cached(cache_dir: str, version_dir: str) -> None:
    """Delete a version's local copy (after the service moved off it; replicas that still
    map its files keep them until they unmap them)."""
    shutil.rmtree(_cached_version(cache_dir, version_dir), ignore_errors=True)


class MappedSide:
    """Clips or texts of one shard: stage-1 ANN, float16 vectors, metadata by row."""

    def __init__(
        self, folder: str, side: str, with_prototypes: bool, kind: str, nprobe: int
    ) -> None:
        names = shard_files.side_files(side, with_prototypes)
        self.side = side
        self.ann = ann.read_mapped(os.path.join(folder, names["ann"]), kind, nprobe)
        self.global_ = np.load(os.path.join(folder, names["global"]), mmap_mode="r")
        self.prototypes = (
            np.load(os.path.join(folder, names["prototypes"]), mmap_mode="r")
            if with_prototypes
            else None
        )
        source = pa.memory_map(os.path.join(folder, names["meta"]), "r")
        self.meta = pa.ipc.open_file(source).read_all()
        self.ids = self.meta.column(shard_files.ID_COLUMN[side])
        self.bias = (
            self.meta.column("bias").to_numpy() if "bias" in self.meta.column_names else None
        )
        if len(self.global_) != self.meta.num_rows or self.ann.ntotal != self.meta.num_rows:
            raise IndexFormatError(f"{folder}: {side} files disagree on the number of rows")

    def __len__(self) -> int:
        return self.meta.num_rows

    def position(self, item_id: str) -> int | None:
        """Row of an id (rows are sorted by id), or None."""
        row = bisect.bisect_left(_Column(self.ids), item_id)
        return row if row < len(self) and self.ids[row].as_py() == item_id else None

    def embeddings(self, rows: np.ndarray) -> Embeddings:
        """float32 embeddings of `rows`, read from the mapped float16 vectors."""
        rows = np.asarray(rows, dtype=np.int64)
        global_ = torch.from_numpy(np.asarray(self.global_[rows], np.float32))
        if self.prototypes is None:
            return Embeddings(global_)
        return Embeddings(global_, torch.from_numpy(np.asarray(self.prototypes[rows], np.float32)))

    def records(self, rows: Sequence[int], columns: Sequence[str]) -> list[dict[str, Any]]:
        """Metadata rows as dicts (only these rows are converted)."""
        if not len(rows):
            return []
        return self.meta.select(list(columns)).take(pa.array(rows, pa.int64())).to_pylist()


class _Column:
    """A sorted Arrow string column as a sequence `bisect` can search (O(log N) rows
    turned into Python strings, never the whole column)."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __getitem__(self, row: int) -> str:
        return self.column[row].as_py()


class MappedShard:
    """Both sides of one shard, and the stored audio of its clips (read on demand)."""

    def __init__(
        self,
        layout: IndexLayout,
        manifest: IndexManifest,
        shard: int,
        folder: str,
        nprobe: int,
        storage_cfg: StorageConfig | None = None,
    ) -> None:
        if not manifest.search:
            raise IndexFormatError(
                f"index version {manifest.version} has no search files (built before they "
                "existed): rebuild it"
            )
        if not 0 <= shard < manifest.search["shards"]:
            raise IndexFormatError(
                f"index version {manifest.version} has {manifest.search['shards']} shards, "
                f"not a shard {shard}"
            )
        protos = bool(manifest.n_prototypes)
        self.layout = layout
        self.manifest = manifest
        self.shard = shard
        kind = manifest.search["ann"]["kind"]
        self.clips = MappedSide(folder, "clips", protos, kind, nprobe)
        self.texts = MappedSide(folder, "texts", protos, kind, nprobe)
        for side in (self.clips, self.texts):
            expected = manifest.search[side.side]["counts"][shard]
            if len(side) != expected:
                raise IndexFormatError(
                    f"index version {manifest.version}: the manifest counts {expected} "
                    f"{side.side} in shard {shard}, its files hold {len(side)}"
                )
        self._storage_cfg = storage_cfg
        self._lock = threading.Lock()
        self._parquet: dict[int, pq.ParquetFile] = {}

    @property
    def version(self) -> str:
        return self.manifest.version

    def clip_audio(self, clip_id: str) -> tuple[bytes, int] | None:
        """(FLAC bytes, sample rate) of a clip, or None if unknown or stored without audio:
        one row group of its unit shard is read."""
        row = self.clips.position(clip_id)
        if row is None:
            return None
        (where,) = self.clips.records([row], ["has_audio", "audio_file", "audio_row"])
        if not where["has_audio"]:
            return None
        with self._lock:
            pf = self._unit_file(where["audio_file"])
            group, offset = 0, where["audio_row"]
            while offset >= pf.metadata.row_group(group).num_rows:
                offset -= pf.metadata.row_group(group).num_rows
                group += 1
            table = pf.read_row_group(group, columns=["audio", "audio_sample_rate"])
        record = table.slice(offset, 1).to_pylist()[0]
        return record["audio"], int(record["audio_sample_rate"])

    def _unit_file(self, unit: int) -> pq.ParquetFile:
        pf = self._parquet.get(unit)
        if pf is None:
            uri = storage.join(self.layout.dir, self.manifest.clip_files[unit])
            fs, path = storage.resolve(uri, self._storage_cfg)
            pf = pq.ParquetFile(fs.open_input_file(path))
            self._parquet[unit] = pf
        return pf


def open_version(
    uri: str,
    *,
    nprobe: int = ann.AnnSettings().nprobe,
    cache_dir: str = "",
    shards: Sequence[int] | None = None,
    storage_cfg: StorageConfig | None = None,
) -> list[MappedShard]:
    """Map the shards (all, or those listed) of the version an index URI names; a version
    on S3 is copied to `cache_dir` first (empty: the temp folder)."""
    layout = resolve_version(uri, storage_cfg)
    manifest = read_manifest(layout, storage_cfg)
    return open_shards(
        layout, manifest, nprobe=nprobe, cache_dir=cache_dir, shards=shards, storage_cfg=storage_cfg
    )


def open_shards(
    layout: IndexLayout,
    manifest: IndexManifest,
    *,
    nprobe: int,
    cache_dir: str = "",
    shards: Sequence[int] | None = None,
    storage_cfg: StorageConfig | None = None,
) -> list[MappedShard]:
    """`open_version` for a version whose manifest the caller has already read."""
    cache_dir = cache_root(cache_dir)
    wanted = range(manifest.search.get("shards", 0)) if shards is None else shards
    return [
        MappedShard(
            layout,
            manifest,
            s,
            local_shard_dir(layout, manifest, s, cache_dir, storage_cfg),
            nprobe,
            storage_cfg,
        )
        for s in wanted
    ]

"""Incremental versions: the embeddings an earlier version already holds, reused by clip.

A build with `index.reuse` (an earlier version built with the same checkpoint weights, or
its index root) embeds only the clips that version lacks or holds with other content
(`store.content_digest`: the audio, or codes, and the captions); every other clip gets
that version's stored clip and caption embeddings, read from its memory-mapped search
shards. `index.delete` (a text file of clip ids, one per line) leaves clips out. Stored
embeddings are the values a rebuild would store, so the version equals a full rebuild.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gpa_ray import storage
from gpa_ray.config import StorageConfig
from gpa_ray.data.schema import text_id
from gpa_ray.index.mapped import MappedShard, open_version
from gpa_ray.index.shard_files import shard_of
from gpa_ray.index.store import content_digest, segment_id
from gpa_ray.models.gpa import Embeddings


class EarlierVersion:
    """An earlier version's shards, mapped, as a lookup of embeddings by clip."""

    def __init__(self, uri: str, cache_dir: str, storage_cfg: StorageConfig | None) -> None:
        self.shards: list[MappedShard] = open_version(
            uri, cache_dir=cache_dir, storage_cfg=storage_cfg
        )

    @property
    def checkpoint_digest(self) -> str:
        return self.shards[0].manifest.checkpoint_digest

    @property
    def segments(self) -> dict[str, Any]:
        """How that version cut long files into windows (empty: one row a clip)."""
        return self.shards[0].manifest.segments

    def find(
        self, row: dict[str, Any]
    ) -> tuple[Embeddings, Embeddings, list[tuple[float, float]]] | None:
        """The stored (segments, captions) embeddings of a clip with unchanged content,
        and each segment's (start, end)."""
        clip_id = row["clip_id"]
        shard = self.shards[shard_of([clip_id], len(self.shards))[0]]
        pos = shard.clips.position(clip_id)
        if pos is None:
            return None
        (stored,) = shard.clips.records([pos], ["content_digest"])
        if stored["content_digest"] != content_digest(row):
            return None
        text_rows = [shard.texts.position(text_id(clip_id, i)) for i in range(len(row["captions"]))]
        if any(r is None for r in text_rows):
            return None
        rows = [pos]
        while (found := shard.clips.position(segment_id(clip_id, len(rows)))) is not None:
            rows.append(found)
        spans = [
            (r["segment_start_s"], r["segment_end_s"])
            for r in shard.clips.records(rows, ["segment_start_s", "segment_end_s"])
        ]
        return (
            shard.clips.embeddings(np.array(rows)),
            shard.texts.embeddings(np.array(text_rows)),
            spans,
        )


def deleted_ids(uri: str, storage_cfg: StorageConfig | None) -> frozenset[str]:
    """Clip ids listed in a deletion file (one per line; blank lines ignored)."""
    if not uri:
        return frozenset()
    lines = storage.read_bytes(uri, storage_cfg).decode().splitlines()
    return frozenset(line.strip() for line in lines if line.strip())

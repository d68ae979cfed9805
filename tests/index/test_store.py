"""Index format: vectors round-trip into the mapped shards, versions and LATEST, clip audio
by row group, bias, and consistency checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from gpa_ray import storage
from gpa_ray.embedding_table import DTYPES
from gpa_ray.index import mapped, store
from gpa_ray.models.gpa import Embeddings
from gpa_ray.testing.synthetic import random_unit_embeddings, synthetic_index_clips


def random_embeddings(n: int, seed: int) -> Embeddings:
    return random_unit_embeddings(n, 16, 4, seed)


def clip_rows(n: int, captions: int = 2) -> list[dict]:
    return synthetic_index_clips(n, captions)


def _write(root: Path, version: str, n: int, **kwargs) -> store.IndexManifest:
    clips = clip_rows(n)
    texts = store.caption_rows(clips)
    return store.write_version(
        str(root),
        version,
        clips,
        random_embeddings(n, seed=1),
        random_embeddings(len(texts), seed=2),
        checkpoint="ckpt",
        **kwargs,
    )


def test_caption_rows_and_text_ids() -> None:
    rows = store.caption_rows(clip_rows(2, captions=2))
    assert [r["text_id"] for r in rows] == [
        "toy/000000#0",
        "toy/000000#1",
        "toy/000001#0",
        "toy/000001#1",
    ]
    assert rows[3] == {
        "text_id": "toy/000001#1",
        "clip_id": "toy/000001",
        "caption_index": 1,
        "text": "caption 1 of clip 1",
    }


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_vectors_round_trip(tmp_path: Path, dtype: str) -> None:
    manifest = _write(tmp_path, "v1", 7, dtype=dtype)
    (shard,) = mapped.open_version(str(tmp_path))
    original = random_embeddings(7, seed=1)
    rows = [shard.clips.position(c["clip_id"]) for c in clip_rows(7)]
    got = shard.clips.embeddings(np.array(rows))
    # Stored values are the original rounded to the storage dtype, exactly.
    expected_g = torch.from_numpy(original.global_.numpy().astype(dtype).astype(np.float32))
    expected_p = torch.from_numpy(original.prototypes.numpy().astype(dtype).astype(np.float32))
    assert torch.equal(got.global_, expected_g)
    assert torch.equal(got.prototypes, expected_p)
    assert got.global_.dtype == torch.float32
    assert shard.clips.global_.dtype == np.dtype(dtype)  # memory-mapped in the stored dtype
    assert (manifest.n_clips, manifest.n_texts, manifest.n_prototypes) == (7, 14, 4)
    shard = pq.read_table(tmp_path / "v1" / manifest.clip_files[0])
    assert shard.schema.field("global").type == pa.list_(DTYPES[dtype], 16)
    assert shard.schema.field("prototypes").type == pa.list_(DTYPES[dtype], 64)


def test_latest_and_version_uris(tmp_path: Path) -> None:
    with pytest.raises(store.IndexFormatError, match="no index at"):
        mapped.open_version(str(tmp_path))
    _write(tmp_path, "v1", 3)
    _write(tmp_path, "v2", 5)
    assert mapped.open_version(str(tmp_path))[0].version == "v2"  # LATEST moved to v2
    assert len(mapped.open_version(str(tmp_path / "v1"))[0].clips) == 3  # a version folder
    pointer = json.loads((tmp_path / "LATEST").read_text())
    assert pointer["version"] == "v2"
    (tmp_path / "LATEST").write_text(json.dumps({"version": "v9"}))
    with pytest.raises(store.IndexFormatError, match="v9"):
        mapped.open_version(str(tmp_path))


def test_clip_audio_is_read_from_its_row_group(tmp_path: Path) -> None:
    clips = clip_rows(150)  # 3 row groups of 64, 64, 22 rows
    for i, clip in enumerate(clips):
        if i % 7:
            clip["audio"], clip["audio_sample_rate"] = f"flac-{i}".encode(), 32000
    texts = store.caption_rows(clips)
    manifest = store.write_version(
        str(tmp_path),
        "v1",
        clips,
        random_embeddings(150, 1),
        random_embeddings(len(texts), 2),
        checkpoint="c",
    )
    assert manifest.clips_with_audio == sum(1 for i in range(150) if i % 7)
    (index,) = mapped.open_version(str(tmp_path))
    assert index.clip_audio("toy/000130") == (b"flac-130", 32000)
    assert index.clip_audio("toy/000001") == (b"flac-1", 32000)
    assert index.clip_audio("toy/000070") is None  # stored without audio
    assert index.clip_audio("nope") is None
    row = index.clips.position("toy/000070")
    assert index.clips.records([row], ["has_audio"]) == [{"has_audio": False}]
    store.write_version(
        str(tmp_path),
        "v2",
        clips,
        random_embeddings(150, 1),
        random_embeddings(len(texts), 2),
        checkpoint="c",
        store_audio=False,
    )
    assert mapped.open_version(str(tmp_path))[0].clip_audio("toy/000130") is None


def test_bias_must_cover_every_text(tmp_path: Path) -> None:
    table = pa.table({"text_id": ["b", "a", "x"], "bias": [2.0, 1.0, 9.0]})
    torch.testing.assert_close(store.align_bias(table, ["a", "b"]), torch.tensor([1.0, 2.0]))
    with pytest.raises(store.IndexFormatError, match="covers 1 of the 2"):
        store.align_bias(table, ["a", "c"])
    texts = store.caption_rows(clip_rows(2))
    bias = pa.table({"text_id": [t["text_id"] for t in texts][::-1], "bias": [0.1, 0.2, 0.3, 0.4]})
    _write(tmp_path, "v1", 2, bias=bias, bias_info={"uri": "memory"})
    (index,) = mapped.open_version(str(tmp_path))
    rows = [index.texts.position(t["text_id"]) for t in texts]
    torch.testing.assert_close(
        torch.from_numpy(index.texts.bias[rows]), torch.tensor([0.4, 0.3, 0.2, 0.1])
    )
    assert index.manifest.bias == {"uri": "memory"}


def test_clips_without_captions_give_an_empty_text_side(tmp_path: Path) -> None:
    clips = clip_rows(3, captions=0)
    store.write_version(
        str(tmp_path), "v1", clips, random_embeddings(3, 1), random_embeddings(0, 2), checkpoint="c"
    )
    (index,) = mapped.open_version(str(tmp_path))
    assert len(index.clips) == 3 and len(index.texts) == 0
    assert index.texts.embeddings(np.zeros(0, np.int64)).prototypes.shape == (0, 4, 16)


def test_inconsistent_manifest_is_refused(tmp_path: Path) -> None:
    _write(tmp_path, "v1", 3)
    manifest = json.loads((tmp_path / "v1" / "manifest.json").read_text())
    manifest["search"]["clips"]["counts"] = [4]
    storage.write_bytes(str(tmp_path / "v1" / "manifest.json"), json.dumps(manifest).encode())
    with pytest.raises(store.IndexFormatError, match="counts 4 clips in shard 0"):
        mapped.open_version(str(tmp_path))
    manifest["format"] = 99
    storage.write_bytes(str(tmp_path / "v1" / "manifest.json"), json.dumps(manifest).encode())
    with pytest.raises(store.IndexFormatError, match="format"):
        mapped.open_version(str(tmp_path))


def test_shards_partition_the_clips_and_keep_captions_with_their_clip(tmp_path: Path) -> None:
    manifest = _write(tmp_path, "v1", 90, shards=3, units=4)
    opened = mapped.open_version(str(tmp_path))
    held = [sorted(s.clips.ids.to_pylist()) for s in opened]
    assert sorted(sum(held, [])) == sorted(c["clip_id"] for c in clip_rows(90))
    assert [len(h) for h in held] == manifest.search["clips"]["counts"]
    for shard, ids in zip(opened, held, strict=True):
        assert shard.clips.ids.to_pylist() == ids  # rows sorted by id
        owners = set(shard.texts.meta.column("clip_id").to_pylist())
        assert owners == set(ids)  # every caption sits with its clip
    assert len(manifest.clip_files) == 4

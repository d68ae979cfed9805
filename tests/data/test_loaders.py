"""Clip shards -> token-id batches: padding, cropping, labels, split selection, Ray Data."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from gpa_ray import storage
from gpa_ray.audio.codec import BOA, EOA, PAD
from gpa_ray.data import schema
from gpa_ray.data.captions import clip_key
from gpa_ray.data.loaders import (
    IGNORE_LABEL,
    CodesCollate,
    LabelSpace,
    LoaderError,
    codes_from_arrow,
    label_frequencies,
    pad_token_ids,
    read_clips,
    scan_labels,
    split_files,
    split_names,
)


def clip_table(codes: list[np.ndarray], labels: list[list[str]], split: str = "train") -> pa.Table:
    """A clip shard following `schema.CLIP_SCHEMA` (no audio) with the given codes/labels."""
    n = len(codes)
    return pa.Table.from_pydict(
        {
            "clip_id": [f"t/{split}/{i}" for i in range(n)],
            "corpus": ["t"] * n,
            "split": [split] * n,
            "source_uri": [""] * n,
            "start_s": [0.0] * n,
            "duration_s": [c.shape[1] / 75 for c in codes],
            "captions": [["a sound"]] * n,
            "labels": labels,
            "n_samples": [c.shape[1] * 320 for c in codes],
            "sample_rate": [24000] * n,
            "codes": schema.codes_array(codes),
            "audio": [None] * n,
            "audio_sample_rate": [None] * n,
        },
        schema=schema.CLIP_SCHEMA,
    )


def codes_of(n_q: int, frames: int, start: int) -> np.ndarray:
    """Codes start, start+1, ... laid out row-major over [n_q, frames]."""
    return (np.arange(n_q * frames, dtype=np.int16) + start).reshape(n_q, frames)


def test_pad_token_ids_pads_per_batch_with_boa_eoa_pad() -> None:
    a = codes_of(4, 3, 0)  # rows [0 1 2], [3 4 5], [6 7 8], [9 10 11]
    b = codes_of(4, 1, 100)  # rows [100], [101], [102], [103]
    ids, mask = pad_token_ids([a, b], codebooks=[0, 2], max_len=10)
    # Longest clip has 3 frames -> width 3 + BOA + EOA = 5 (not max_len): ids are code + 3.
    expected = torch.tensor(
        [
            [[BOA, 3, 4, 5, EOA], [BOA, 9, 10, 11, EOA]],
            [[BOA, 103, EOA, PAD, PAD], [BOA, 105, EOA, PAD, PAD]],
        ]
    )
    assert torch.equal(ids, expected)
    assert torch.equal(mask, torch.tensor([[[1] * 5, [1] * 5], [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]]))
    assert ids.dtype == torch.int64


def test_pad_token_ids_crops_to_max_len() -> None:
    ids, mask = pad_token_ids([codes_of(1, 6, 10)], codebooks=[0], max_len=4)
    # max_len 4 keeps 2 frames: BOA, 10+3, 11+3, EOA.
    assert ids.tolist() == [[[BOA, 13, 14, EOA]]]
    assert mask.tolist() == [[[1, 1, 1, 1]]]


def test_pad_token_ids_rejects_missing_codebook() -> None:
    with pytest.raises(LoaderError, match="codebook 3"):
        pad_token_ids([codes_of(2, 2, 0)], codebooks=[3], max_len=8)


def test_codes_from_arrow_reads_sliced_columns() -> None:
    codes = [codes_of(4, 5, 0), codes_of(4, 2, 50), codes_of(4, 7, 500)]
    table = clip_table(codes, [["x"]] * 3).slice(1, 2)
    out = codes_from_arrow(table.column("codes"))
    assert [c.shape for c in out] == [(4, 2), (4, 7)]
    assert np.array_equal(out[0], codes[1]) and np.array_equal(out[1], codes[2])


def test_label_space_encodes_single_and_multi_label() -> None:
    single = LabelSpace(labels=("cat", "dog"), multi_label=False)
    assert single.encode([["dog"], ["cat"], ["cow"], []]).tolist() == [
        1,
        0,
        IGNORE_LABEL,
        IGNORE_LABEL,
    ]
    multi = LabelSpace(labels=("cat", "dog", "rain"), multi_label=True)
    out = multi.encode([["rain", "cat"], [], ["cow", "dog"]])
    assert out.tolist() == [[1.0, 0.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def write_corpus(root: str, storage_cfg: object = None) -> None:
    """Two train shards (one corpus a, one corpus b) and a val shard."""
    train_a = clip_table([codes_of(4, 3, 0), codes_of(4, 2, 7)], [["dog"], ["cat"]])
    train_b = clip_table([codes_of(4, 4, 1)], [["rain"]])
    val = clip_table([codes_of(4, 2, 3)], [["cow"]], split="val")
    storage.write_parquet(f"{root}/clips/a/train/part-000000.parquet", train_a, storage_cfg)
    storage.write_parquet(f"{root}/clips/b/train/part-000001.parquet", train_b, storage_cfg)
    storage.write_parquet(f"{root}/clips/a/val/part-000002.parquet", val, storage_cfg)


def test_split_files_and_label_scan(tmp_path: Path) -> None:
    root = str(tmp_path)
    write_corpus(root)
    assert [Path(u).parent.name for u in split_files(root, "train")] == ["train", "train"]
    assert len(split_files(root, "train", corpus="b")) == 1
    assert len(split_files(root, "val")) == 1
    space = scan_labels(root, "train")
    # The val-only label "cow" stays out of the vocabulary; one label per clip -> single.
    assert space == LabelSpace(labels=("cat", "dog", "rain"), multi_label=False)
    storage.write_parquet(
        f"{root}/clips/c/train/part-000003.parquet",
        clip_table([codes_of(4, 2, 0)], [["dog", "bark"]]),
    )
    assert scan_labels(root, "train").multi_label
    with pytest.raises(LoaderError, match="no clip shards"):
        scan_labels(root, "test")


def test_several_splits_read_as_one(tmp_path: Path) -> None:
    # AudioFormer pre-trains on balanced + unbalanced AudioSet: "a+b" names both splits.
    root = str(tmp_path)
    write_corpus(root)
    assert split_names("balanced_train+unbalanced_train") == ["balanced_train", "unbalanced_train"]
    for bad in ("train+", "+val", "train+train"):
        with pytest.raises(LoaderError, match=re.escape(f"split setting {bad!r}")):
            split_names(bad)
    both = split_files(root, "val+train")
    assert [Path(u).parent.name for u in both] == ["val", "train", "train"]
    assert both[1:] == split_files(root, "train") and both[:1] == split_files(root, "val")
    assert [Path(u).parent.name for u in split_files(root, "train+val", corpus="a")] == [
        "train",
        "val",
    ]
    assert scan_labels(root, "train+val").labels == ("cat", "cow", "dog", "rain")
    # A clip with a repeated label counts once for it.
    storage.write_parquet(
        f"{root}/clips/c/train/part-000003.parquet",
        clip_table([codes_of(4, 2, 0)], [["dog", "bark", "dog"]]),
    )
    frequencies = label_frequencies(root, "train+val")
    assert dict(frequencies.counts) == {"dog": 2, "cat": 1, "rain": 1, "cow": 1, "bark": 1}
    assert frequencies.n_clips == 5
    with pytest.raises(LoaderError, match="no clip shards"):
        label_frequencies(root, "test")


def test_codes_collate_builds_tensors() -> None:
    table = clip_table([codes_of(4, 3, 0), codes_of(4, 1, 9)], [["dog"], ["cat"]])
    space = LabelSpace(labels=("cat", "dog"), multi_label=False)
    batch = CodesCollate([1], max_len=16, label_space=space)(table)
    assert batch["input_ids"].tolist() == [[[BOA, 6, 7, 8, EOA]], [[BOA, 13, EOA, PAD, PAD]]]
    assert batch["targets"].tolist() == [1, 0]
    assert batch["clip_keys"].tolist() == [clip_key("t/train/0"), clip_key("t/train/1")]
    without_ids = CodesCollate([1], max_len=16)(table.drop(["clip_id"]))
    assert set(without_ids) == {"input_ids", "attention_mask"}


@pytest.mark.s3
def test_read_clips_from_s3_through_ray_data(ray_session: None, s3_server: object) -> None:
    root = s3_server.uri("loaders")
    write_corpus(root, s3_server.storage)
    ds = read_clips(root, "train", columns=["codes", "labels"], storage_cfg=s3_server.storage)
    space = scan_labels(root, "train", storage_cfg=s3_server.storage)
    batches = list(
        ds.iterator().iter_torch_batches(
            batch_size=8, collate_fn=CodesCollate([0, 3], max_len=32, label_space=space)
        )
    )
    assert len(batches) == 1
    ids = batches[0]["input_ids"]
    # Three train clips, two codebooks, longest clip 4 frames -> width 6.
    assert ids.shape == (3, 2, 6)
    assert sorted(batches[0]["targets"].tolist()) == [0, 1, 2]
    assert sorted(int(row[0, 1]) for row in ids) == [3, 4, 10]  # first code + 3 of each clip
    with pytest.raises(LoaderError, match="no clip shards"):
        read_clips(root, "test", storage_cfg=s3_server.storage)
    # Several splits: one dataset, the splits' rows in the order named.
    both = read_clips(root, "val+train", columns=["split"], storage_cfg=s3_server.storage)
    assert [row["split"] for row in both.take_all()] == ["val", "train", "train", "train"]
    with pytest.raises(LoaderError, match="no clip shards found at .*/test"):
        read_clips(root, "train+test", storage_cfg=s3_server.storage)

"""Clip shards -> Ray Data datasets -> torch batches for training.

Ingest writes `<data>/clips/<corpus>/<split>/part-N.parquet` (see `gpa_ray.data.ingest`).
A training run reads one split of one corpus (or of every corpus) as a Ray Dataset; each
Ray Train worker iterates its shard with `iter_torch_batches` and a collate function that
turns an Arrow batch into tensors:

- `codes` (int16 [n_q, T] per clip) -> AudioFormer token ids per selected codebook,
  `[BOA] c+3 ... [EOA]`, padded with PAD to the longest clip *of the batch* (not of the
  corpus: 10 s AudioSet clips next to 1 s FSD50K clips would otherwise waste most of the
  compute on padding), cropped to `max_len` positions, with an attention mask.
- `labels` (list<string>) -> multi-hot rows, or class indices for single-label data.

`per_caption` turns a clip stream into a (clip, caption) pair stream for training on
every caption of every clip (`train.pairs_per_epoch=caption`).

The label vocabulary comes from the training split, scanned file by file with only the
`labels` column read, so its cost does not grow with the size of the codes or audio.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import ArrowBatchCollateFn

from gpa_ray import storage
from gpa_ray.audio.codec import PAD, to_token_ids
from gpa_ray.config import StorageConfig
from gpa_ray.data.captions import clip_key
from gpa_ray.data.weighted_sampling import LabelFrequencies

IGNORE_LABEL = -100
"""Class index of a clip with no known label (CE ignores it; metrics drop it)."""


class LoaderError(ValueError):
    """The requested clips are missing or do not fit the requested batch layout."""


def shard_split(clips: str, uri: str) -> str | None:
    """The split of a clip shard laid out as ingest writes it below the `clips` folder
    (`<corpus>/<split>/...`); None for a file outside that layout."""
    parts = uri[len(clips) :].strip("/").split("/")
    return parts[1] if len(parts) >= 3 else None


SPLIT_SEPARATOR = "+"


def split_names(split: str) -> list[str]:
    """The splits a split setting names: one, or several joined by "+" (AudioFormer
    pre-trains on "balanced_train+unbalanced_train"), in the order given."""
    names = [name.strip() for name in split.split(SPLIT_SEPARATOR)]
    if not all(names) or len(set(names)) != len(names):
        raise LoaderError(
            f"split setting {split!r}: name one split or several distinct ones joined by "
            f"{SPLIT_SEPARATOR!r}"
        )
    return names


def split_files(
    data: str, split: str, corpus: str = "", storage_cfg: StorageConfig | None = None
) -> list[str]:
    """The parquet files of a split (or of several, "a+b") under an ingest output: each
    split's files as sorted URIs, the splits in the order named.

    `corpus` empty means every corpus under `<data>/clips/`.
    """
    clips = storage.join(data, "clips")
    names = split_names(split)
    if corpus:
        folders = [storage.join(clips, corpus, name) for name in names]
        return [uri for f in folders for uri in storage.list_files(f, ".parquet", storage_cfg)]
    every = storage.list_files(clips, ".parquet", storage_cfg)
    return [uri for name in names for uri in every if shard_split(clips, uri) == name]


def read_clips(
    data: str,
    split: str,
    *,
    corpus: str = "",
    columns: Sequence[str] | None = None,
    storage_cfg: StorageConfig | None = None,
) -> Any:
    """One split (or several, "a+b") as a lazy Ray Dataset of `columns` (all if None);
    local path or s3://.

    Its rows come in file order, then row order (`ordered`), however the read tasks
    finish, so every consumer sees the same sequence run after run."""
    import ray

    files: list[str] = []
    for name in split_names(split):
        found = split_files(data, name, corpus, storage_cfg)
        if not found:
            where = storage.join(data, "clips", corpus or "*", name)
            raise LoaderError(f"no clip shards found at {where}; run ingest first")
        files += found
    fs, _ = storage.resolve(files[0], storage_cfg)
    paths = [storage.resolve(uri, storage_cfg)[1] for uri in files]
    dataset = ordered(ray.data.read_parquet(paths, filesystem=fs))
    # Ray Data pushes the projection down into the parquet reader.
    return dataset.select_columns(list(columns)) if columns is not None else dataset


def ordered(dataset: Any) -> Any:
    """`dataset` with `preserve_order` set in its own DataContext (shared by every dataset
    derived from it): blocks leave each operator in input order, `streaming_split` deals
    them to workers deterministically (ignoring locality), and batches leave the collate
    threads of `iter_batches` in order. Without it, each depends on which task finishes
    first, and so do float sums, batch composition and shuffles downstream."""
    dataset.context.execution_options.preserve_order = True
    return dataset


CAPTION_COLUMN = "caption"
CAPTION_INDEX_COLUMN = "caption_index"


def expand_captions(table: pa.Table) -> pa.Table:
    """One row per (clip, caption) of a clip batch, in clip order then caption order: the
    `captions` list becomes `caption` (one text) and `caption_index` (its position in the
    clip's list); every other column is repeated. A clip without captions is an error."""
    captions = table.column("captions").combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(captions), 0).to_numpy(zero_copy_only=False)
    if (lengths == 0).any():
        clip = table.column("clip_id")[int(np.argmax(lengths == 0))].as_py()
        raise LoaderError(f"clip {clip!r} has no captions to train on")
    rows = np.repeat(np.arange(len(table)), lengths)
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    position = (np.arange(len(rows)) - starts).astype(np.int32)
    out = table.drop_columns(["captions"]).take(pa.array(rows, pa.int64()))
    out = out.append_column(CAPTION_COLUMN, captions.flatten())
    return out.append_column(CAPTION_INDEX_COLUMN, pa.array(position, pa.int32()))


def per_caption(dataset: Any) -> Any:
    """A clip dataset as a stream of (clip, caption) rows (`expand_captions` per block).

    Streaming and order-preserving: each block becomes the expanded block in place, so the
    row sequence is a function of the block order alone, and nothing is materialised."""
    return dataset.map_batches(
        expand_captions, batch_format="pyarrow", batch_size=None, zero_copy_batch=True
    )


@dataclasses.dataclass(frozen=True)
class LabelSpace:
    """The class vocabulary of a run and how targets are encoded.

    Single-label data (every training clip has exactly one label, e.g. ESC-50) gets class
    indices [B] (IGNORE_LABEL for an unknown label); multi-label data gets multi-hot rows
    [B, C] (unknown labels are dropped, since the model has no output for them).
    """

    labels: tuple[str, ...]
    multi_label: bool

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def index(self) -> dict[str, int]:
        return {label: i for i, label in enumerate(self.labels)}

    def encode(self, clip_labels: Sequence[Sequence[str]]) -> torch.Tensor:
        """Targets for a batch: float multi-hot [B, C] or long class indices [B]."""
        index = self.index()
        if self.multi_label:
            out = torch.zeros(len(clip_labels), self.n_classes)
            for row, labels in enumerate(clip_labels):
                for label in labels:
                    if label in index:
                        out[row, index[label]] = 1.0
            return out
        return torch.tensor(
            [
                index.get(labels[0], IGNORE_LABEL) if labels else IGNORE_LABEL
                for labels in clip_labels
            ],
            dtype=torch.long,
        )


def _label_columns(
    data: str, split: str, corpus: str, storage_cfg: StorageConfig | None
) -> Iterator[pa.Array]:
    """The `labels` column of a split's clip shards, batch by batch (nothing else is read)."""
    files = split_files(data, split, corpus, storage_cfg)
    if not files:
        raise LoaderError(f"no clip shards for split {split!r} under {data}")
    for uri in files:
        fs, path = storage.resolve(uri, storage_cfg)
        with fs.open_input_file(path) as f:
            for batch in pq.ParquetFile(f).iter_batches(columns=["labels"], batch_size=4096):
                yield batch.column(0)


def scan_labels(
    data: str, split: str = "train", corpus: str = "", storage_cfg: StorageConfig | None = None
) -> LabelSpace:
    """Build the label space from one split, streaming only its `labels` column."""
    seen: set[str] = set()
    multi_label = False
    for column in _label_columns(data, split, corpus, storage_cfg):
        counts = pc.list_value_length(column).to_numpy(zero_copy_only=False)
        multi_label = multi_label or bool((counts != 1).any())
        seen.update(v for v in pc.unique(column.flatten()).to_pylist() if v is not None)
    if not seen:
        raise LoaderError(f"split {split!r} under {data} has no labels")
    return LabelSpace(labels=tuple(sorted(seen)), multi_label=multi_label)


def label_frequencies(
    data: str, split: str = "train", corpus: str = "", storage_cfg: StorageConfig | None = None
) -> LabelFrequencies:
    """Clips per label and clips of a split (or of several, "a+b"), streaming only its
    `labels` column; a clip counts once per distinct label (`weighted_sampling`)."""
    counts: dict[str, int] = {}
    n_clips = 0
    for column in _label_columns(data, split, corpus, storage_cfg):
        n_clips += len(column)
        pairs = pa.table({"clip": pc.list_parent_indices(column), "label": pc.list_flatten(column)})
        distinct = pairs.group_by(["clip", "label"]).aggregate([]).column("label")
        for item in pc.value_counts(distinct.drop_null()).to_pylist():
            counts[item["values"]] = counts.get(item["values"], 0) + item["counts"]
    return LabelFrequencies(counts=counts, n_clips=n_clips)


def codes_from_arrow(column: pa.Array | pa.ChunkedArray) -> list[np.ndarray]:
    """The `codes` column (list<list<int16>>) as int16 arrays [n_q, T], one per clip.

    Works on the flattened buffers (two `flatten`s and the list lengths) instead of
    converting 3,000 codes per clip to Python integers.
    """
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        raise LoaderError(
            f"{arr.null_count} of {len(arr)} clips have no EnCodec codes (ingested with "
            "ingest.codes=false): re-ingest with ingest.codes=true to train or embed with "
            "an AudioFormer tower"
        )
    rows_per_clip = pc.list_value_length(arr).to_numpy(zero_copy_only=False)
    inner = arr.flatten()
    row_lengths = pc.list_value_length(inner).to_numpy(zero_copy_only=False)
    values = inner.flatten().to_numpy(zero_copy_only=False)
    out: list[np.ndarray] = []
    row = 0
    start = 0
    for clip, n_q in enumerate(rows_per_clip):
        lengths = row_lengths[row : row + n_q]
        if n_q == 0 or (lengths != lengths[0]).any():
            raise LoaderError(f"clip {clip}: codes rows must be non-empty and equally long")
        size = int(n_q * lengths[0])
        out.append(values[start : start + size].reshape(int(n_q), int(lengths[0])))
        row += int(n_q)
        start += size
    return out


def pad_token_ids(
    codes: Sequence[np.ndarray], codebooks: Sequence[int], max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, Q, L] and attention mask [B, Q, L] for the selected codebooks.

    Each row is `[BOA] c+3 ... [EOA]` of at most `max_len` tokens (longer clips keep their
    first `max_len - 2` frames), right-padded with PAD; L is the longest row of the batch.
    The mask is 1 on BOA, codes and EOA, 0 on padding.
    """
    if max_len < 3:
        raise LoaderError(f"max_len must leave room for BOA, a code and EOA, got {max_len}")
    if not codes:
        raise LoaderError("empty batch")
    keep = max_len - 2
    width = min(max_len, max(c.shape[1] for c in codes) + 2)
    ids = np.full((len(codes), len(codebooks), width), PAD, dtype=np.int64)
    mask = np.zeros((len(codes), len(codebooks), width), dtype=np.int64)
    for b, clip in enumerate(codes):
        n_frames = min(clip.shape[1], keep)
        for slot, q in enumerate(codebooks):
            if q >= clip.shape[0]:
                raise LoaderError(f"codebook {q} requested but clip {b} has {clip.shape[0]}")
            ids[b, slot, : n_frames + 2] = to_token_ids(clip[q, :n_frames])
            mask[b, slot, : n_frames + 2] = 1
    return torch.from_numpy(ids), torch.from_numpy(mask)


def clip_key_tensor(clip_ids: Sequence[object]) -> torch.Tensor:
    """[B] int64 `clip_key`s of a batch's clip ids: equal exactly for items of one clip."""
    return torch.tensor([clip_key(str(c)) for c in clip_ids], dtype=torch.long)


class CodesCollate(ArrowBatchCollateFn):
    """Arrow batch -> {"input_ids", "attention_mask"[, "targets"][, "clip_keys"]} tensors.

    `input_ids`/`attention_mask` are [B, Q, L] for the selected codebooks; `targets` (only
    with a label space) follows `LabelSpace.encode`; `clip_keys` (when the batch has a
    `clip_id` column) are `clip_key` ints, for losses that must recognise a repeated clip.
    """

    def __init__(
        self, codebooks: Sequence[int], max_len: int, label_space: LabelSpace | None = None
    ) -> None:
        super().__init__()
        self.codebooks = tuple(codebooks)
        self.max_len = max_len
        self.label_space = label_space

    def __call__(self, batch: pa.Table) -> dict[str, torch.Tensor]:
        ids, mask = pad_token_ids(
            codes_from_arrow(batch.column("codes")), self.codebooks, self.max_len
        )
        out = {"input_ids": ids, "attention_mask": mask}
        if self.label_space is not None:
            out["targets"] = self.label_space.encode(batch.column("labels").to_pylist())
        if "clip_id" in batch.column_names:
            out["clip_keys"] = clip_key_tensor(batch.column("clip_id").to_pylist())
        return out

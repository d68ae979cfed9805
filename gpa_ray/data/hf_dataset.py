"""A Hugging Face `datasets` dataset saved to disk (`save_to_disk`) as a corpus.

The folder holds one dataset or a `DatasetDict` of splits, each a set of memory-mapped
Arrow files. The manifest names a row by a row URI (`hf-dataset:<root>?split=S&row=N`)
instead of a file, and the ingest reads its audio bytes back through `RowAudio`, which
maps each split once per actor (no copy: the Arrow files stay on disk, paged in as read).
An Audio cell holds the file's bytes or only its path (audio `datasets` did not embed),
which is then read as a file. Local folders only: `datasets` reads S3 through
s3fs, which this project does not install.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from gpa_ray.config import CorpusConfig, StorageConfig

if TYPE_CHECKING:
    from datasets import Dataset

SCHEME = "hf-dataset:"
"""The prefix of a row URI: what `fetch` recognises as a dataset row, not a file."""


class HFDatasetError(ValueError):
    """The folder is not a saved dataset, or lacks a configured column."""


def row_uri(root: str, split: str, row: int) -> str:
    return f"{SCHEME}{quote(root)}?split={quote(split)}&row={row}"


def is_row_uri(uri: str) -> bool:
    return uri.startswith(SCHEME)


def parse_row_uri(uri: str) -> tuple[str, str, int]:
    """(dataset folder, split, row) of a row URI."""
    parts = urlsplit(uri[len(SCHEME) :])
    query = parse_qs(parts.query)
    return unquote(parts.path), query["split"][0], int(query["row"][0])


def load_splits(root: str) -> dict[str, Dataset]:
    """The saved dataset's splits (one unnamed dataset is the split ""), audio undecoded:
    the ingest decodes the bytes itself, as it does a file's."""
    try:
        import datasets
    except ImportError as exc:
        raise HFDatasetError(
            f"corpus.kind=hf_dataset ({root}) needs the datasets package: pip install 'gpa_ray[hf]'"
        ) from exc
    if not os.path.isdir(root):
        raise HFDatasetError(f"{root}: not a local folder (a Hugging Face dataset saved to disk)")
    try:
        loaded = datasets.load_from_disk(root)
    except (FileNotFoundError, ValueError) as exc:
        raise HFDatasetError(f"{root} is not a dataset saved by save_to_disk: {exc}") from exc
    found = dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"": loaded}
    return {split: _undecoded(ds) for split, ds in found.items()}


def _undecoded(ds: Dataset) -> Dataset:
    from datasets import Audio

    features = ds.features.copy()
    audio = [name for name, feature in features.items() if isinstance(feature, Audio)]
    for name in audio:
        features[name] = Audio(decode=False)
    return ds.cast(features) if audio else ds


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value if v is not None]


def read_hf_dataset(
    cfg: CorpusConfig, name: str, storage_cfg: StorageConfig | None = None
) -> Iterator[dict[str, Any]]:
    """(clip id, split, row URI, captions, labels) of every row, split by split; a split
    without a name takes `corpus.default_split`."""
    splits = load_splits(cfg.root)
    for split, ds in splits.items():
        wanted = [cfg.audio_column, cfg.caption_column] + (
            [cfg.label_column] if cfg.label_column else []
        )
        missing = [c for c in wanted if c not in ds.column_names]
        if missing:
            raise HFDatasetError(
                f"{cfg.root} (split {split or 'unnamed'}): no column(s) {missing}; it has "
                f"{ds.column_names} (set corpus.audio_column / caption_column / label_column)"
            )
        text = ds.select_columns([c for c in wanted if c != cfg.audio_column])
        for row, record in enumerate(text):
            yield {
                "clip_id": f"{name}/{split or cfg.default_split}/{row}",
                "split": split or cfg.default_split,
                "source_uri": row_uri(cfg.root, split, row),
                "captions": _strings(record[cfg.caption_column]),
                "labels": _strings(record[cfg.label_column]) if cfg.label_column else [],
            }


class RowAudio:
    """Audio bytes of row URIs; each dataset folder is mapped once and kept. Thread-safe:
    the ingest fetches a unit's clips on a thread pool, and `datasets` is not safe to load
    one folder from several threads at once."""

    def __init__(self, audio_column: str) -> None:
        self.audio_column = audio_column
        self._splits: dict[str, dict[str, Dataset]] = {}
        self._lock = threading.Lock()

    def read(self, uri: str) -> bytes:
        """The row's audio bytes (`FileNotFoundError` if the row or its file is absent)."""
        root, split, row = parse_row_uri(uri)
        with self._lock:
            if root not in self._splits:
                self._splits[root] = load_splits(root)
            ds = self._splits[root].get(split)
            if ds is None or not 0 <= row < len(ds):
                raise FileNotFoundError(f"{uri}: no such split or row in {root}")
            cell = ds[row][self.audio_column] or {}
        if cell.get("bytes"):
            return cell["bytes"]
        path = cell.get("path") or ""
        if not path:
            raise FileNotFoundError(f"{uri}: the audio cell holds neither bytes nor a path")
        with open(path, "rb") as f:
            return f.read()

"""Corpus readers: each official layout -> a stream of uniform manifest rows.

Every reader yields dicts with exactly the columns of `schema.MANIFEST_SCHEMA`
(`clip_id`, `corpus`, `split`, `source_uri`, `start_s`, `duration_s`, `captions`,
`labels`), lazily, so a 2M-row AudioSet segments file is streamed line by line rather
than loaded. Readers only *name* the audio file (`source_uri`); whether it exists is
checked by the ingest pipeline, where a missing file becomes an error row with stage
`locate` instead of being dropped here without a trace.

`clip_id` is `<corpus>/<source id>[/<segment>]`: stable across runs and unique within a
corpus, because resume and the train/test protocol both key on it.

Layouts (all paths relative to `corpus.root`, a local folder or `s3://` URI; the audio
folder is `corpus.audio_dir` when set, otherwise the first existing usual place):

- `folder`: `captions.csv` (`file_name,caption[,split][,labels]`, one row per caption,
  labels `;`-separated), audio under `audio/` (else the root). Written by
  `gpa_ray.data.synthetic`.
- `esc50`: `meta/esc50.csv` + `audio/`; split from `fold`, labels from `category`,
  captions from `corpus.caption_templates`.
- `audiocaps`: `captions.csv` (`file_name,youtube_id,start_time,split,caption`) or the
  official `train.csv`/`val.csv`/`test.csv` (`audiocap_id,youtube_id,start_time,caption`);
  the captions of one (youtube_id, start_time) are grouped; files by `corpus.audio_pattern`.
- `clotho`: `clotho_captions_{development,validation,evaluation}.csv`
  (`file_name,caption_1..caption_5`) -> splits train/val/test; audio under
  `<split name>/`, `clotho_audio_<split name>/` or `audio/`.
- `audioset`: `balanced_train_segments.csv`, `unbalanced_train_segments.csv`,
  `eval_segments.csv` at the root, or `corpus.caption_files` (`YTID, start_seconds,
  end_seconds, positive_labels`, `#` comment lines) + `class_labels_indices.csv`; split =
  file stem without `_segments`, labels as display names, no captions.
- `fsd50k`: the published `FSD50K.ground_truth/dev.csv` (`fname,labels,mids,split`, split
  `train` or `val`) and `eval.csv` (`fname,labels,mids`) -> splits train/val/eval; audio
  `FSD50K.dev_audio/<fname>.wav` and `FSD50K.eval_audio/<fname>.wav`; labels as the
  `labels` column's names (comma-separated), no captions.
- `audio_files`: no index file, the common case of a user's own sound library: every
  audio file (`AUDIO_SUFFIXES`) under the audio folder, recursively, one clip each with
  no captions or labels, split `corpus.default_split`, clip id from its relative path.
  Such clips are indexed and searched by text or audio; training needs captions.
- `hf_dataset`: a Hugging Face `datasets` folder written by `save_to_disk` (one dataset
  or a `DatasetDict` of splits), with `corpus.audio_column`, `caption_column` (a string or
  a list of strings) and optional `label_column`; rows named by row URIs
  (`gpa_ray.data.hf_dataset`), clip id `<name>/<split>/<row>`.
- `wavcaps`: `*.json` files `{"data": [{"id", "caption", "audio" | "wav_path", ...}]}`;
  an entry whose path is absent or the `"wav_path"` placeholder is found by
  `corpus.wavcaps_pattern`.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import os
from collections.abc import Callable, Iterator
from typing import Any

from gpa_ray import storage
from gpa_ray.config import CorpusConfig, StorageConfig

logger = logging.getLogger(__name__)

Row = dict[str, Any]

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".mp3")
"""Files an `audio_files` corpus holds (what `gpa_ray.audio.io` decodes), any case."""
CLOTHO_SPLITS = {"development": "train", "validation": "val", "evaluation": "test"}
AUDIOCAPS_SPLITS = ("train", "val", "test")


class CorpusError(ValueError):
    """A corpus layout is unusable as a whole (missing or malformed index file)."""


def corpus_name(cfg: CorpusConfig) -> str:
    """The corpus's name in clip ids and output folders: `corpus.name`, else its kind."""
    name = cfg.name or cfg.kind
    if "/" in name or name.startswith("."):
        raise CorpusError(f"corpus name {name!r} may not contain '/' or start with '.'")
    return name


def _uri(root: str, rel: str) -> str:
    """`rel` under `root`, unless `rel` is already absolute (a full path or s3:// URI)."""
    if storage.is_s3(rel) or os.path.isabs(rel):
        return rel
    return storage.join(root, rel)


def _row(
    clip_id: str,
    corpus: str,
    split: str,
    source_uri: str,
    captions: list[str],
    labels: list[str],
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> Row:
    return {
        "clip_id": clip_id,
        "corpus": corpus,
        "split": split,
        "source_uri": source_uri,
        "start_s": float(start_s),
        "duration_s": None if duration_s is None else float(duration_s),
        "captions": [c.strip() for c in captions if c and c.strip()],
        "labels": [lab for lab in labels if lab],
    }


def _open_text(uri: str, storage_cfg: StorageConfig | None) -> io.TextIOWrapper:
    """A streaming UTF-8 text reader (BOM tolerated) for a local or s3:// file."""
    fs, path = storage.resolve(uri, storage_cfg)
    try:
        stream = fs.open_input_stream(path)
    except (OSError, ValueError) as exc:
        raise CorpusError(f"cannot open {uri}: {exc}") from exc
    return io.TextIOWrapper(stream, encoding="utf-8-sig", newline="")


def _csv_dicts(
    uri: str, storage_cfg: StorageConfig | None, required: tuple[str, ...]
) -> Iterator[dict[str, str]]:
    """Stream a CSV's rows as dicts, checking the header holds the `required` columns."""
    with _open_text(uri, storage_cfg) as text:
        reader = csv.DictReader(text)
        header = [h.strip() for h in (reader.fieldnames or [])]
        missing = [c for c in required if c not in header]
        if missing:
            raise CorpusError(f"{uri}: missing column(s) {missing}; header is {header}")
        reader.fieldnames = header
        for rec in reader:
            yield {k: (v or "").strip() for k, v in rec.items() if k is not None}


def _audio_base(
    root: str, cfg: CorpusConfig, candidates: list[str], storage_cfg: StorageConfig | None
) -> str:
    """The folder audio file names are relative to: `audio_dir`, else the first existing
    candidate under `root`, else `root` (so a wrong guess still surfaces as locate errors)."""
    if cfg.audio_dir:
        return _uri(root, cfg.audio_dir)
    for rel in candidates:
        uri = storage.join(root, rel)
        if storage.exists(uri, storage_cfg):
            return uri
    return root


def _index_files(
    root: str, cfg: CorpusConfig, default: list[str], storage_cfg: StorageConfig | None
) -> list[str]:
    """`corpus.caption_files` if given, else the `default` names that exist under `root`."""
    if cfg.caption_files:
        return [_uri(root, f) for f in cfg.caption_files]
    found = [
        storage.join(root, f) for f in default if storage.exists(storage.join(root, f), storage_cfg)
    ]
    if not found:
        raise CorpusError(f"no index file under {root}: expected one of {default}")
    return found


def read_folder(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """`captions.csv` with one row per caption; rows of one file are merged into one clip."""
    name = corpus_name(cfg)
    base = _audio_base(cfg.root, cfg, ["audio"], storage_cfg)
    clips: dict[str, dict[str, Any]] = {}
    for index in _index_files(cfg.root, cfg, ["captions.csv"], storage_cfg):
        for rec in _csv_dicts(index, storage_cfg, ("file_name", "caption")):
            clip = clips.setdefault(rec["file_name"], {"captions": [], "labels": [], "split": ""})
            clip["captions"].append(rec["caption"])
            clip["split"] = clip["split"] or rec.get("split", "")
            for label in rec.get("labels", "").split(";"):
                if label.strip() and label.strip() not in clip["labels"]:
                    clip["labels"].append(label.strip())
    for file_name, clip in clips.items():
        yield _row(
            f"{name}/{file_name}",
            name,
            clip["split"] or cfg.default_split,
            _uri(base, file_name) if file_name else "",
            clip["captions"],
            clip["labels"],
        )


def read_esc50(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """ESC-50: split by fold, the category as label, captions from templates."""
    name = corpus_name(cfg)
    index = _index_files(cfg.root, cfg, ["meta/esc50.csv"], storage_cfg)[0]
    base = _audio_base(cfg.root, cfg, ["audio"], storage_cfg)
    fold_split = {}
    for split, folds in (
        ("train", cfg.esc50_train_folds),
        ("val", cfg.esc50_val_folds),
        ("test", cfg.esc50_test_folds),
    ):
        for fold in folds:
            if fold in fold_split:
                raise CorpusError(
                    f"ESC-50 fold {fold} is assigned to both {fold_split[fold]} and {split}"
                )
            fold_split[fold] = split
    skipped = 0
    for rec in _csv_dicts(index, storage_cfg, ("filename", "fold", "category")):
        split = fold_split.get(int(rec["fold"]))
        if split is None:
            skipped += 1
            continue
        category = rec["category"]
        words = category.replace("_", " ")
        yield _row(
            f"{name}/{os.path.splitext(rec['filename'])[0]}",
            name,
            split,
            _uri(base, rec["filename"]),
            [t.format(category=words) for t in cfg.caption_templates],
            [category],
        )
    if skipped:
        logger.info("esc50: %d rows in folds not assigned to any split were not read", skipped)


def read_audiocaps(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """AudioCaps: the captions of one YouTube segment grouped into one clip."""
    name = corpus_name(cfg)
    defaults = (
        ["captions.csv"]
        if storage.exists(storage.join(cfg.root, "captions.csv"), storage_cfg)
        else [f"{s}.csv" for s in AUDIOCAPS_SPLITS]
    )
    bases: dict[str, str] = {}
    for index in _index_files(cfg.root, cfg, defaults, storage_cfg):
        stem = os.path.splitext(os.path.basename(index))[0]
        file_split = stem if stem in AUDIOCAPS_SPLITS else cfg.default_split
        clips: dict[tuple[str, str, str], dict[str, Any]] = {}
        for rec in _csv_dicts(index, storage_cfg, ("youtube_id", "start_time", "caption")):
            split = rec.get("split") or file_split
            key = (split, rec["youtube_id"], rec["start_time"])
            clip = clips.setdefault(key, {"captions": [], "file_name": rec.get("file_name", "")})
            clip["captions"].append(rec["caption"])
        for (split, youtube_id, start_time), clip in clips.items():
            if split not in bases:
                bases[split] = _audio_base(
                    cfg.root, cfg, [f"audio/{split}", split, "audio"], storage_cfg
                )
            file_name = clip["file_name"] or cfg.audio_pattern.format(
                youtube_id=youtube_id, start_time=start_time
            )
            yield _row(
                f"{name}/{youtube_id}/{start_time}",
                name,
                split,
                _uri(bases[split], file_name),
                clip["captions"],
                [],
            )


def read_clotho(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """Clotho: one row per clip with caption_1..caption_5; file names may contain spaces."""
    name = corpus_name(cfg)
    defaults = [f"clotho_captions_{s}.csv" for s in CLOTHO_SPLITS]
    for index in _index_files(cfg.root, cfg, defaults, storage_cfg):
        stem = os.path.splitext(os.path.basename(index))[0]
        official = stem.removeprefix("clotho_captions_")
        if official in CLOTHO_SPLITS:
            split = CLOTHO_SPLITS[official]
            candidates = [official, f"clotho_audio_{official}", f"audio/{official}", "audio"]
        else:
            split, candidates = cfg.default_split, ["audio"]
        base = _audio_base(cfg.root, cfg, candidates, storage_cfg)
        for rec in _csv_dicts(index, storage_cfg, ("file_name", "caption_1")):
            captions = [rec.get(f"caption_{i}", "") for i in range(1, 6)]
            yield _row(
                f"{name}/{rec['file_name']}",
                name,
                split,
                _uri(base, rec["file_name"]),
                captions,
                [],
            )


FSD50K_INDEXES = {"dev": "FSD50K.ground_truth/dev.csv", "eval": "FSD50K.ground_truth/eval.csv"}
"""The published FSD50K ground-truth files, relative to the corpus root."""


def read_fsd50k(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """FSD50K: one row per clip; dev.csv carries its own train/val split, eval.csv is eval.

    `corpus.caption_files` may name the two files instead (a name containing "eval" is the
    eval split); `corpus.audio_dir` overrides both audio folders (then one folder).
    """
    name = corpus_name(cfg)
    files = cfg.caption_files or list(FSD50K_INDEXES.values())
    for rel in files:
        index = _uri(cfg.root, rel)
        if not storage.exists(index, storage_cfg):
            raise CorpusError(f"no FSD50K ground-truth file {index}")
        part = "eval" if "eval" in os.path.basename(rel) else "dev"
        base = _audio_base(cfg.root, cfg, [f"FSD50K.{part}_audio"], storage_cfg)
        required = ("fname", "labels", "split") if part == "dev" else ("fname", "labels")
        for rec in _csv_dicts(index, storage_cfg, required):
            split = rec["split"] if part == "dev" else "eval"
            yield _row(
                f"{name}/{rec['fname']}",
                name,
                split,
                _uri(base, f"{rec['fname']}.wav"),
                [],
                rec["labels"].split(","),
            )


AUDIOSET_INDEXES = (
    "balanced_train_segments.csv",
    "eval_segments.csv",
    "unbalanced_train_segments.csv",
)
"""The segment CSVs of the published AudioSet layout, at the corpus root (sorted)."""


def audioset_display_names(cfg: CorpusConfig, storage_cfg: StorageConfig | None) -> dict[str, str]:
    """`class_labels_indices.csv`: label mid -> display name."""
    uri = storage.join(cfg.root, "class_labels_indices.csv")
    if not storage.exists(uri, storage_cfg):
        raise CorpusError(f"AudioSet needs {uri} (mid -> display name)")
    return {
        rec["mid"]: rec["display_name"]
        for rec in _csv_dicts(uri, storage_cfg, ("mid", "display_name"))
    }


def audioset_index_files(
    cfg: CorpusConfig, storage_cfg: StorageConfig | None
) -> list[tuple[str, str]]:
    """(segment CSV, split) pairs: `corpus.caption_files`, else the published names that
    exist at the root. Only those few names are looked up: the root also holds the audio
    (2M objects for AudioSet-2M), so listing it would cost a full scan of the corpus."""
    if cfg.caption_files:
        indexes = [_uri(cfg.root, f) for f in cfg.caption_files]
    else:
        indexes = [
            storage.join(cfg.root, name)
            for name in AUDIOSET_INDEXES
            if storage.exists(storage.join(cfg.root, name), storage_cfg)
        ]
        if not indexes:
            raise CorpusError(
                f"no AudioSet segment CSV under {cfg.root}: expected one of "
                f"{list(AUDIOSET_INDEXES)} (or name them in corpus.caption_files)"
            )
    return [
        (uri, os.path.splitext(os.path.basename(uri))[0].removesuffix("_segments"))
        for uri in indexes
    ]


def audioset_audio_base(cfg: CorpusConfig, split: str, storage_cfg: StorageConfig | None) -> str:
    """The folder a split's audio file names are relative to."""
    return _audio_base(cfg.root, cfg, [f"audio/{split}", split, "audio"], storage_cfg)


def audioset_file_uri(cfg: CorpusConfig, base: str, ytid: str, start: str, end: str) -> str:
    """A segment's audio file under `base`, named by `corpus.audio_pattern`."""
    name = cfg.audio_pattern.format(
        youtube_id=ytid, start_time=int(float(start)), start_seconds=start, end_seconds=end
    )
    return _uri(base, name)


def read_audioset(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """AudioSet segments CSVs, streamed line by line; labels as display names.

    The simple path, one dict per segment; `gpa_ray.data.audioset_index` reads the same
    files into Arrow batches for the ingest manifest and is tested against this one.
    """
    name = corpus_name(cfg)
    display = audioset_display_names(cfg, storage_cfg)
    for index, split in audioset_index_files(cfg, storage_cfg):
        base = audioset_audio_base(cfg, split, storage_cfg)
        with _open_text(index, storage_cfg) as text:
            lines = (line for line in text if line.strip() and not line.lstrip().startswith("#"))
            for fields in csv.reader(lines, skipinitialspace=True):
                if len(fields) < 4:
                    raise CorpusError(f"{index}: malformed segment line {fields!r}")
                ytid, start, end, mids = fields[0], float(fields[1]), float(fields[2]), fields[3]
                trimmed = cfg.segments_trimmed
                yield _row(
                    f"{name}/{ytid}/{start:g}",
                    name,
                    split,
                    audioset_file_uri(cfg, base, ytid, fields[1], fields[2]),
                    [],
                    [display.get(m.strip(), m.strip()) for m in mids.split(",")],
                    start_s=0.0 if trimmed else start,
                    duration_s=None if trimmed else end - start,
                )


def read_wavcaps(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """WavCaps JSON files: one caption per entry; ids are unique per JSON file (source)."""
    name = corpus_name(cfg)
    if cfg.caption_files:
        indexes = [_uri(cfg.root, f) for f in cfg.caption_files]
    else:
        indexes = storage.list_files(cfg.root, ".json", storage_cfg)
        if not indexes:
            raise CorpusError(f"no *.json under {cfg.root}")
    base = _audio_base(cfg.root, cfg, ["audio"], storage_cfg)
    for index in indexes:
        source = os.path.splitext(os.path.basename(index))[0]
        try:
            entries = json.loads(storage.read_bytes(index, storage_cfg))["data"]
        except (ValueError, KeyError, TypeError) as exc:
            raise CorpusError(f"{index}: not a WavCaps JSON ({{'data': [...]}}): {exc}") from exc
        for entry in entries:
            clip = str(entry["id"])
            path = entry.get("audio") or entry.get("wav_path") or ""
            if not path or path == "wav_path":
                path = cfg.wavcaps_pattern.format(id=clip)
            yield _row(
                f"{name}/{source}/{clip}",
                name,
                cfg.default_split,
                _uri(base, path),
                [entry.get("caption", "")],
                [],
            )


def read_audio_files(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """Every audio file under the audio folder (`audio_dir`, else `audio/`, else the root),
    in sorted order: a folder or bucket of sounds with no captions file."""
    name = corpus_name(cfg)
    base = _audio_base(cfg.root, cfg, ["audio"], storage_cfg).rstrip("/")
    try:
        uris = storage.list_files(base, "", storage_cfg)
    except storage.StorageError as exc:
        raise CorpusError(str(exc)) from exc
    found = [uri for uri in uris if uri.lower().endswith(AUDIO_SUFFIXES)]
    if not found:
        raise CorpusError(
            f"no audio files ({', '.join(AUDIO_SUFFIXES)}) under {base}: "
            "set corpus.root (or corpus.audio_dir) to the folder that holds them"
        )
    for uri in found:
        yield _row(f"{name}/{uri[len(base) + 1 :]}", name, cfg.default_split, uri, [], [])


def read_hf_dataset(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """A Hugging Face dataset saved to disk (see `gpa_ray.data.hf_dataset`)."""
    from gpa_ray.data import hf_dataset

    name = corpus_name(cfg)
    try:
        for rec in hf_dataset.read_hf_dataset(cfg, name, storage_cfg):
            yield _row(
                rec["clip_id"],
                name,
                rec["split"],
                rec["source_uri"],
                rec["captions"],
                rec["labels"],
            )
    except hf_dataset.HFDatasetError as exc:
        raise CorpusError(str(exc)) from exc


READERS: dict[str, Callable[[CorpusConfig, StorageConfig | None], Iterator[Row]]] = {
    "folder": read_folder,
    "esc50": read_esc50,
    "audiocaps": read_audiocaps,
    "clotho": read_clotho,
    "audioset": read_audioset,
    "fsd50k": read_fsd50k,
    "wavcaps": read_wavcaps,
    "audio_files": read_audio_files,
    "hf_dataset": read_hf_dataset,
}


def iter_manifest(cfg: CorpusConfig, storage_cfg: StorageConfig | None = None) -> Iterator[Row]:
    """The manifest rows of the configured corpus, in a stable order, at most `corpus.limit`."""
    if cfg.kind not in READERS:
        raise CorpusError(f"unknown corpus kind {cfg.kind!r}; expected one of {sorted(READERS)}")
    if not cfg.root:
        raise CorpusError("corpus.root is empty: set it to the corpus folder or s3:// URI")
    rows = READERS[cfg.kind](cfg, storage_cfg)
    return itertools.islice(rows, cfg.limit) if cfg.limit is not None else rows

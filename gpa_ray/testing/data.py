"""Real test data: the shared ESC-50 audio, and clip tables, clip shards and caption files
with a held-out split made from it.

The audio is never copied into the repository; it lives in `shared_data_dir()`.
Importing this module does not import torch (`tests/conftest.py` imports it for every
session, torch-free ones included).
"""

from __future__ import annotations

import csv
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa

from gpa_ray import storage
from gpa_ray.config import CodecConfig, Config, CorpusConfig, IngestConfig, StorageConfig
from gpa_ray.config_loading import load_config
from gpa_ray.data.corpora import iter_manifest
from gpa_ray.data.ingest import ClipEncoder, clip_shard_table, run_ingest
from gpa_ray.data.work_units import Layout

SHARED_DATA_ENV = "GPA_RAY_SHARED_DATA"
ESC50_POOL_TRAIN, ESC50_POOL_TEST = 12, 4
"""Real ESC-50 clips in the tests' small retrieval pool (the `esc50_pool` fixture): training
queries for the bias job, and test clips (two captions each) for evaluation."""


def shared_data_dir() -> Path:
    """Folder of real test audio: `$GPA_RAY_SHARED_DATA`, else `../shared/data` from the repo."""
    env = os.environ.get(SHARED_DATA_ENV)
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def esc50_records(esc50_dir: str | Path) -> list[dict[str, str]]:
    """The rows of ESC-50's `meta/esc50.csv` (`filename`, `fold`, `category`, `src_file`, ...)."""
    with open(Path(esc50_dir) / "meta" / "esc50.csv", newline="") as f:
        return list(csv.DictReader(f))


def esc50_clip_table(
    esc50_dir: str | Path, n_clips: int, sample_rate: int = 32000, max_seconds: float = 5.0
) -> pa.Table:
    """A clip-shard-like Arrow table (`clip_id`, `captions`, `labels`, FLAC `audio`) of the
    first `n_clips` real ESC-50 clips of `meta/esc50.csv`, with one templated caption
    each ("the sound of a dog"), cut to `max_seconds`. Skips EnCodec, so tests that only
    need audio + captions get rows in well under a second per clip."""
    from gpa_ray.audio.io import encode_flac, load_waveform  # deferred: it imports torch

    esc50_dir = Path(esc50_dir)
    rows: dict[str, list[object]] = {"clip_id": [], "captions": [], "labels": [], "audio": []}
    for rec in esc50_records(esc50_dir)[:n_clips]:
        data = (esc50_dir / "audio" / rec["filename"]).read_bytes()
        wave = load_waveform(data, rec["filename"], sample_rate)[: round(max_seconds * sample_rate)]
        category = rec["category"]
        rows["clip_id"].append(f"esc50/{Path(rec['filename']).stem}")
        rows["captions"].append([f"the sound of a {category.replace('_', ' ')}"])
        rows["labels"].append([category])
        rows["audio"].append(encode_flac(wave, sample_rate))
    return pa.table(
        {
            "clip_id": pa.array(rows["clip_id"], pa.string()),
            "captions": pa.array(rows["captions"], pa.list_(pa.string())),
            "labels": pa.array(rows["labels"], pa.list_(pa.string())),
            "audio": pa.array(rows["audio"], pa.binary()),
        }
    )


def tiny_esc50_ingest(output: str, n_clips: int = 8, seconds: float = 1.0) -> dict[str, Any]:
    """Run the real ingest (Ray Data, EnCodec `random:0`, FLAC audio kept) on the first
    `n_clips` clips of the shared ESC-50 subset cut to `seconds`, into a local `output`:
    units of 4 clips, compacted into shards of ~0.16 MB, which at 1 s per clip (~30-45 kB
    of FLAC each) is 4 clips per shard. Needs a running Ray; a completed output is left as
    it is."""
    cfg = load_config(
        overrides=[
            "corpus.kind=esc50",
            f"corpus.root={shared_data_dir() / 'esc50'}",
            f"corpus.limit={n_clips}",
            f"ingest.output={output}",
            f"ingest.max_seconds={seconds}",
            "ingest.rows_per_commit=4",
            "ingest.target_shard_mb=0.16",
            "ingest.encode_pool.actors=1",
        ]
    )
    return run_ingest(cfg)


def write_esc50_clip_shards(
    output: str,
    esc50_root: str | Path,
    n_train: int = 12,
    n_test: int = 4,
    seconds: float = 1.0,
    storage_cfg: StorageConfig | None = None,
) -> None:
    """Real ESC-50 clips through the ingest pipeline's own reader and `ClipEncoder` into the
    ingest layout under `output` (`clips/esc50/{train,test}/part-000000.parquet`, local or
    s3://), without a Ray Data run: the first clip of `n_train` categories (train) and the
    second clip of the first `n_test` of them (test), `seconds` long, captioned by the
    ESC-50 templates. Does nothing if `output` already holds clip shards, so tests of one
    session can share one output."""
    if storage.list_files(storage.join(output, "clips"), ".parquet", storage_cfg):
        return
    root = Path(esc50_root)
    records = esc50_records(root)
    seen: dict[str, int] = {}
    chosen: list[dict[str, str]] = []
    for rec in records:
        seen[rec["category"]] = seen.get(rec["category"], 0) + 1
        if seen[rec["category"]] == 1 and len(seen) <= n_train:
            chosen.append({**rec, "fold": "1"})
    train_categories = [rec["category"] for rec in chosen][:n_test]
    for category in train_categories:
        second = [rec for rec in records if rec["category"] == category][1]
        chosen.append({**second, "fold": "5"})
    cfg = Config(
        storage=storage_cfg or StorageConfig(),
        codec=CodecConfig(weights="random:0"),
        ingest=IngestConfig(output=output, max_seconds=seconds),
    )
    layout = Layout(output, "esc50")
    with tempfile.TemporaryDirectory() as subset:
        (Path(subset) / "meta").mkdir()
        with open(Path(subset) / "meta" / "esc50.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(chosen)
        corpus = CorpusConfig(
            kind="esc50",
            root=subset,
            audio_dir=str(root / "audio"),
            esc50_train_folds=[1],
            esc50_val_folds=[],
            esc50_test_folds=[5],
        )
        encoder = ClipEncoder(cfg)
        rows: dict[str, list[dict[str, object]]] = {}
        for row in iter_manifest(corpus, cfg.storage):
            rows.setdefault(row["split"], []).append(encoder.process(row, encoder.fetch(row)))
    for split, split_rows in rows.items():
        storage.write_parquet(
            layout.clips_file(split, 0), clip_shard_table(split_rows), storage_cfg
        )


def esc50_holdout_captions(
    esc50_dir: str | Path,
    out_csv: str | Path,
    templates: tuple[str, ...] | list[str] = (
        "the sound of a {category}",
        "a {category} can be heard",
    ),
    holdout_per_class: int = 2,
) -> str:
    """A `folder`-corpus `captions.csv` over the real ESC-50 clips with a held-out part.

    The shared ESC-50 copy holds all of fold 4 but only 14 clips of the other folds, so a
    fold split leaves a 14-clip test. Here, within fold 4, each category's source
    recordings (`src_file`, which ESC-50 keeps inside one fold so that takes of one
    recording never straddle a split) are taken in a fixed hashed order until at least
    `holdout_per_class` clips are held out (`val`); the rest of fold 4 is `train`, and
    the clips of the other folds are held out too. Captions come from `templates`
    (`{category}` with spaces). Returns the CSV path; use it with
    `corpus.kind=folder corpus.root=<esc50_dir> corpus.audio_dir=audio
    corpus.caption_files=[<csv>]`.
    """
    records = esc50_records(esc50_dir)
    sources: dict[str, dict[str, int]] = {}
    for rec in records:
        if rec["fold"] == "4":
            per_class = sources.setdefault(rec["category"], {})
            per_class[rec["src_file"]] = per_class.get(rec["src_file"], 0) + 1
    held: set[tuple[str, str]] = set()
    for category, counts in sources.items():
        order = sorted(counts, key=lambda s: hashlib.sha256(f"{category}/{s}".encode()).digest())
        n = 0
        for src in order:
            if n >= holdout_per_class:
                break
            held.add((category, src))
            n += counts[src]
    out_csv = Path(out_csv)
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with open(out_csv, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "caption", "split", "labels"])
        for rec in records:
            category = rec["category"]
            train = rec["fold"] == "4" and (category, rec["src_file"]) not in held
            for template in templates:
                caption = template.format(category=category.replace("_", " "))
                writer.writerow([rec["filename"], caption, "train" if train else "val", category])
    return str(out_csv)

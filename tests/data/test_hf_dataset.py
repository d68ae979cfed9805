"""A Hugging Face `datasets` folder saved to disk read as a corpus and ingested
(issue 19 item 5), on real ESC-50 clips."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
from datasets import Audio, Dataset, DatasetDict

from gpa_ray import storage
from gpa_ray.config import CorpusConfig
from gpa_ray.config_loading import load_config
from gpa_ray.data import schema
from gpa_ray.data.corpora import CorpusError, iter_manifest
from gpa_ray.data.ingest import run_ingest
from gpa_ray.testing.data import esc50_records


def _save(shared_data: Path, root: Path) -> list[dict]:
    """Train: 4 clips with their bytes and two captions each; test: 2 clips whose audio
    cell holds only a file's path (as `datasets` stores audio it did not embed)."""
    audio = shared_data / "esc50" / "audio"
    records = esc50_records(shared_data / "esc50")[:6]
    words = [r["category"].replace("_", " ") for r in records]
    train = Dataset.from_dict(
        {
            "audio": [
                {"bytes": (audio / r["filename"]).read_bytes(), "path": r["filename"]}
                for r in records[:4]
            ],
            "caption": [[f"the sound of a {w}", f"a {w} can be heard"] for w in words[:4]],
            "label": [[w] for w in words[:4]],
        }
    )
    (root / "files").mkdir(parents=True)
    copied = root / "files" / records[5]["filename"]
    copied.write_bytes((audio / records[5]["filename"]).read_bytes())
    test = Dataset.from_dict(
        {
            "audio": [
                {"bytes": None, "path": str(audio / records[4]["filename"])},
                {"bytes": None, "path": str(copied)},
            ],
            "caption": [f"a {w}" for w in words[4:]],
            "label": [[w] for w in words[4:]],
        }
    )
    splits = {"train": train, "test": test}
    data = DatasetDict({k: v.cast_column("audio", Audio()) for k, v in splits.items()})
    data.save_to_disk(str(root / "dataset"))
    return records


def _cfg(root: Path, **extra) -> CorpusConfig:
    return CorpusConfig(kind="hf_dataset", root=str(root / "dataset"), name="hf", **extra)


def test_reader_names_rows_captions_and_labels(shared_data: Path, tmp_path: Path) -> None:
    records = _save(shared_data, tmp_path)
    rows = list(iter_manifest(_cfg(tmp_path, label_column="label")))
    pa.Table.from_pylist(rows, schema=schema.MANIFEST_SCHEMA)
    assert [r["clip_id"] for r in rows] == [f"hf/train/{i}" for i in range(4)] + [
        "hf/test/0",
        "hf/test/1",
    ]
    word = records[0]["category"].replace("_", " ")
    assert rows[0]["captions"] == [f"the sound of a {word}", f"a {word} can be heard"]
    assert rows[0]["labels"] == [word] and rows[5]["split"] == "test"
    assert all(r["labels"] == [] for r in iter_manifest(_cfg(tmp_path)))
    with pytest.raises(CorpusError, match=r"no column\(s\) \['text'\].*caption_column"):
        list(iter_manifest(_cfg(tmp_path, caption_column="text")))
    with pytest.raises(CorpusError, match="not a dataset saved by save_to_disk"):
        list(iter_manifest(CorpusConfig(kind="hf_dataset", root=str(tmp_path / "files"))))


def test_ingest_reads_bytes_and_paths(ray_session, shared_data: Path, tmp_path: Path) -> None:
    records = _save(shared_data, tmp_path)
    cfg = load_config(
        overrides=[
            "corpus.kind=hf_dataset",
            f"corpus.root={tmp_path / 'dataset'}",
            "corpus.name=hf",
            f"ingest.output={tmp_path / 'ingest'}",
            "ingest.max_seconds=1",
            "ingest.encode_pool.actors=1",
        ]
    )
    summary = run_ingest(cfg)
    assert summary["clips_ok"] == 6, summary
    rows = [
        row
        for uri in storage.list_files(str(tmp_path / "ingest" / "clips"), ".parquet")
        for row in storage.read_parquet(uri).to_pylist()
    ]
    assert sorted(r["clip_id"] for r in rows) == sorted(
        [f"hf/train/{i}" for i in range(4)] + ["hf/test/0", "hf/test/1"]
    )
    # Every clip is a 44.1 kHz ESC-50 file cut to 1 s, whichever way its cell held it.
    assert {(r["sample_rate"], r["n_samples"]) for r in rows} == {(44100, 44100)}, records


def test_row_audio_is_safe_on_the_ingest_thread_pool(shared_data: Path, tmp_path: Path) -> None:
    """The ingest fetches a unit's clips from several threads at once; the first reads of a
    fresh reader all load the same folder."""
    from concurrent.futures import ThreadPoolExecutor

    from gpa_ray.data.hf_dataset import RowAudio, row_uri

    records = _save(shared_data, tmp_path)
    audio = shared_data / "esc50" / "audio"
    root = str(tmp_path / "dataset")
    for _ in range(3):
        reader = RowAudio("audio")
        uris = [row_uri(root, "train", i % 4) for i in range(16)]
        with ThreadPoolExecutor(8) as pool:
            got = list(pool.map(reader.read, uris))
        assert got == [(audio / records[i % 4]["filename"]).read_bytes() for i in range(16)]

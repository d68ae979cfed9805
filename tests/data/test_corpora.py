"""Corpus readers on real index files (shared data) and on small official layouts."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from gpa_ray.config import CorpusConfig, SyntheticConfig
from gpa_ray.data import schema
from gpa_ray.data.corpora import CorpusError, iter_manifest
from gpa_ray.data.synthetic import generate_corpus
from gpa_ray.testing.data import esc50_records


def _rows(**kwargs) -> list[dict]:
    rows = list(iter_manifest(CorpusConfig(**kwargs)))
    # Every reader's rows fit the one manifest schema (this raises otherwise).
    pa.Table.from_pylist(rows, schema=schema.MANIFEST_SCHEMA)
    assert len({r["clip_id"] for r in rows}) == len(rows), "clip_id must be unique"
    return rows


def test_esc50_reader_on_shared_csv(shared_data: Path) -> None:
    root = shared_data / "esc50"
    rows = _rows(kind="esc50", root=str(root))
    meta = {r["filename"]: r for r in esc50_records(root)}
    assert len(rows) == len(meta) == 414
    # Default folds: 1-3 train, 4 val, 5 test. The shared copy holds all 400 fold-4 clips.
    assert Counter(r["split"] for r in rows)["val"] == 400
    for row in rows:
        name = Path(row["source_uri"]).name
        assert row["clip_id"] == f"esc50/{Path(name).stem}"
        assert row["labels"] == [meta[name]["category"]]
        assert Path(row["source_uri"]).is_file()
    fire = next(r for r in rows if r["labels"] == ["crackling_fire"])
    assert fire["captions"] == ["the sound of a crackling fire", "a crackling fire can be heard"]


def test_esc50_folds_and_templates_are_configurable(shared_data: Path) -> None:
    rows = _rows(
        kind="esc50",
        root=str(shared_data / "esc50"),
        esc50_train_folds=[1, 2, 3, 5],
        esc50_val_folds=[],
        esc50_test_folds=[4],
        caption_templates=["{category}!"],
    )
    assert Counter(r["split"] for r in rows) == {"test": 400, "train": 14}
    assert all(r["captions"] == [f"{r['labels'][0].replace('_', ' ')}!"] for r in rows)
    with pytest.raises(CorpusError, match="fold 4"):
        _rows(kind="esc50", root=str(shared_data / "esc50"), esc50_train_folds=[4])


def test_audiocaps_reader_on_official_csvs(shared_data: Path) -> None:
    root = shared_data / "audiocaps_csv" / "dataset"
    rows = _rows(kind="audiocaps", root=str(root))
    by_split = Counter(r["split"] for r in rows)
    # Row counts of train/val/test.csv are 49,838 / 2,475 / 4,875: one caption per train
    # clip, five per val/test clip (the dataset README's 49,838 / 495 / 975 clips).
    assert by_split == {"train": 49838, "val": 495, "test": 975}
    assert {len(r["captions"]) for r in rows if r["split"] != "train"} == {5}
    clip = next(r for r in rows if r["clip_id"] == "audiocaps/7fmOlUlwoNg/20")
    with open(root / "test.csv", newline="") as f:
        expected = [
            r["caption"]
            for r in csv.DictReader(f)
            if (r["youtube_id"], r["start_time"]) == ("7fmOlUlwoNg", "20")
        ]
    assert clip["captions"] == expected and len(expected) == 5
    assert clip["source_uri"] == str(root / "7fmOlUlwoNg_20.wav")
    custom = _rows(
        kind="audiocaps",
        root=str(root),
        audio_pattern="Y{youtube_id}.wav",
        caption_files=["val.csv"],
        audio_dir="/data/wavs",
    )
    assert len(custom) == 495
    assert all(r["source_uri"].startswith("/data/wavs/Y") for r in custom)


def test_audiocaps_reader_on_demo_captions(shared_data: Path) -> None:
    rows = _rows(kind="audiocaps", root=str(shared_data / "audiocaps_demo"))
    assert len(rows) == 14
    assert all(len(r["captions"]) == 5 and r["split"] == "test" for r in rows)
    assert all(Path(r["source_uri"]).is_file() for r in rows)


def test_clotho_reader_official_and_demo(shared_data: Path) -> None:
    root = shared_data / "clotho_demo"
    rows = _rows(kind="clotho", root=str(root))
    assert Counter(r["split"] for r in rows) == {"train": 2893, "test": 1045}
    assert {len(r["captions"]) for r in rows} == {5}
    demo = _rows(
        kind="clotho",
        root=str(root),
        caption_files=["captions_for_clips.csv"],
        default_split="test",
    )
    assert len(demo) == 7
    assert all(Path(r["source_uri"]).is_file() for r in demo)
    pug = next(r for r in demo if "pug" in r["clip_id"])
    assert pug["clip_id"] == "clotho/01 A pug struggles to breathe 1_14_2008.wav"
    assert pug["captions"][1] == "A small dog with a flat face snoring and groaning"


AUDIOSET_LABELS = """index,mid,display_name
0,/m/09x0r,"Speech"
1,/m/0bt9lr,"Dog"
2,/m/04rlf,"Music"
3,/m/07yv9,"Vehicle"
"""

AUDIOSET_SEGMENTS = """# Segments csv created Sun Mar  5 10:54:31 2017
# num_ytids=3, num_segs=3, num_unique_labels=3, num_positive_labels=4
# YTID, start_seconds, end_seconds, positive_labels
--PJHxphWEs, 30.000, 40.000, "/m/09x0r,/m/0bt9lr"
--ZhevVpy1s, 50.000, 60.000, "/m/04rlf"
--aE2O5G5WE, 0.000, 10.000, "/m/07yv9"
"""

AUDIOSET_EVAL = """# Segments csv created Sun Mar  5 10:54:25 2017
# num_ytids=1, num_segs=1, num_unique_labels=1, num_positive_labels=1
# YTID, start_seconds, end_seconds, positive_labels
-0RWZT-miFs, 420.000, 430.000, "/m/0bt9lr"
"""


def test_audioset_reader_on_official_layout(tmp_path: Path) -> None:
    (tmp_path / "class_labels_indices.csv").write_text(AUDIOSET_LABELS)
    (tmp_path / "balanced_train_segments.csv").write_text(AUDIOSET_SEGMENTS)
    (tmp_path / "eval_segments.csv").write_text(AUDIOSET_EVAL)
    (tmp_path / "audio").mkdir()
    rows = _rows(kind="audioset", root=str(tmp_path))
    assert [r["clip_id"] for r in rows] == [
        "audioset/--PJHxphWEs/30",
        "audioset/--ZhevVpy1s/50",
        "audioset/--aE2O5G5WE/0",
        "audioset/-0RWZT-miFs/420",
    ]
    assert [r["split"] for r in rows] == ["balanced_train"] * 3 + ["eval"]
    assert rows[0]["labels"] == ["Speech", "Dog"]
    assert rows[3]["labels"] == ["Dog"]
    assert all(r["captions"] == [] for r in rows)
    assert rows[0]["source_uri"] == str(tmp_path / "audio" / "--PJHxphWEs_30.wav")
    assert (rows[0]["start_s"], rows[0]["duration_s"]) == (0.0, None)
    # Whole recordings: the segment is cut at decode time from start_s for duration_s.
    untrimmed = _rows(
        kind="audioset",
        root=str(tmp_path),
        segments_trimmed=False,
        audio_pattern="{youtube_id}.wav",
        caption_files=["eval_segments.csv"],
    )
    assert (untrimmed[0]["start_s"], untrimmed[0]["duration_s"]) == (420.0, 10.0)
    assert untrimmed[0]["source_uri"].endswith("/audio/-0RWZT-miFs.wav")


def test_fsd50k_reader_on_official_layout(tmp_path: Path) -> None:
    truth = tmp_path / "FSD50K.ground_truth"
    truth.mkdir()
    (truth / "dev.csv").write_text(
        "fname,labels,mids,split\n"
        '64760,"Electric_guitar,Guitar,Music","/m/02sgy,/m/0342h,/m/04rlf",train\n'
        "16399,Bark,/m/05tny_,val\n"
    )
    (truth / "eval.csv").write_text('fname,labels,mids\n37199,"Walk_and_footsteps",/m/07pbtc8\n')
    (tmp_path / "FSD50K.dev_audio").mkdir()
    (tmp_path / "FSD50K.eval_audio").mkdir()
    rows = _rows(kind="fsd50k", root=str(tmp_path))
    assert [(r["clip_id"], r["split"]) for r in rows] == [
        ("fsd50k/64760", "train"),
        ("fsd50k/16399", "val"),
        ("fsd50k/37199", "eval"),
    ]
    assert rows[0]["labels"] == ["Electric_guitar", "Guitar", "Music"]
    assert rows[0]["source_uri"] == str(tmp_path / "FSD50K.dev_audio" / "64760.wav")
    assert rows[2]["source_uri"] == str(tmp_path / "FSD50K.eval_audio" / "37199.wav")
    assert all(r["captions"] == [] and r["duration_s"] is None for r in rows)
    (truth / "eval.csv").unlink()
    with pytest.raises(CorpusError, match="eval.csv"):
        _rows(kind="fsd50k", root=str(tmp_path))


def test_wavcaps_reader_on_official_layout(tmp_path: Path) -> None:
    data = {
        "num_captions_per_audio": 1,
        "data": [
            # SoundBible/BBC/AudioSet_SL style: "audio" is the literal placeholder.
            {"id": "2219", "caption": "A door creaks open.", "audio": "wav_path", "duration": 3.2},
            {"id": "2220", "caption": "Rain falls on a roof.", "wav_path": "sb/2220.flac"},
            {"id": "2221", "caption": "  ", "audio": "/abs/2221.wav", "duration": 1.0},
        ],
    }
    (tmp_path / "json_files").mkdir()
    (tmp_path / "json_files" / "sb_final.json").write_text(json.dumps(data))
    rows = _rows(kind="wavcaps", root=str(tmp_path), default_split="train")
    assert [r["clip_id"] for r in rows] == [
        "wavcaps/sb_final/2219",
        "wavcaps/sb_final/2220",
        "wavcaps/sb_final/2221",
    ]
    assert [r["source_uri"] for r in rows] == [
        str(tmp_path / "2219.flac"),
        str(tmp_path / "sb" / "2220.flac"),
        "/abs/2221.wav",
    ]
    assert rows[0]["captions"] == ["A door creaks open."]
    assert rows[2]["captions"] == []
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(CorpusError, match="not a WavCaps JSON"):
        _rows(kind="wavcaps", root=str(tmp_path))


def test_folder_reader_on_synthetic_corpus(tmp_path: Path) -> None:
    summary = generate_corpus(
        SyntheticConfig(n_clips=5, min_seconds=0.2, max_seconds=0.3), str(tmp_path)
    )
    rows = _rows(kind="folder", root=str(tmp_path), name="synthetic")
    assert len(rows) == 5
    assert sum(len(r["captions"]) for r in rows) == summary["n_captions"]
    assert Counter(r["split"] for r in rows) == {k: v for k, v in summary["splits"].items() if v}
    assert all(Path(r["source_uri"]).is_file() for r in rows)
    assert all(r["clip_id"].startswith("synthetic/synth_") for r in rows)
    assert all(r["labels"][0].startswith("sound:") for r in rows)


def test_folder_reader_groups_captions_and_labels(tmp_path: Path) -> None:
    (tmp_path / "captions.csv").write_text(
        "file_name,caption,labels\n"
        "a.wav,a dog barks,dog;animal\n"
        "b.wav,rain,\n"
        "a.wav,a dog barks twice,dog;loud\n"
    )
    rows = _rows(kind="folder", root=str(tmp_path), default_split="val", limit=5)
    assert rows[0]["captions"] == ["a dog barks", "a dog barks twice"]
    assert rows[0]["labels"] == ["dog", "animal", "loud"]
    assert rows[1]["labels"] == [] and rows[1]["split"] == "val"
    # No audio/ folder here: names resolve against the root itself.
    assert rows[1]["source_uri"] == str(tmp_path / "b.wav")
    assert len(_rows(kind="folder", root=str(tmp_path), limit=1)) == 1


def test_layout_errors_are_loud(tmp_path: Path) -> None:
    with pytest.raises(CorpusError, match="unknown corpus kind 'esc51'"):
        _rows(kind="esc51", root=str(tmp_path))
    with pytest.raises(CorpusError, match="corpus.root is empty"):
        _rows(kind="folder")
    with pytest.raises(CorpusError, match="captions.csv"):
        _rows(kind="folder", root=str(tmp_path))
    (tmp_path / "captions.csv").write_text("name,text\nx.wav,hello\n")
    with pytest.raises(CorpusError, match=r"missing column\(s\) \['file_name', 'caption'\]"):
        _rows(kind="folder", root=str(tmp_path))
    with pytest.raises(CorpusError, match="class_labels_indices.csv"):
        _rows(kind="audioset", root=str(tmp_path))


@pytest.mark.s3
def test_readers_stream_index_files_from_s3(s3_server) -> None:
    root = s3_server.uri("corpora", "synthetic")
    generate_corpus(
        SyntheticConfig(n_clips=3, min_seconds=0.2, max_seconds=0.3), root, s3_server.storage
    )
    cfg = CorpusConfig(kind="folder", root=root, name="synthetic")
    rows = list(iter_manifest(cfg, s3_server.storage))
    assert len(rows) == 3
    # The `audio/` folder is found on S3 too (a prefix, not a real directory there).
    assert all(r["source_uri"].startswith(f"{root}/audio/synth_") for r in rows)


def test_audio_files_reader_lists_a_captionless_library(tmp_path: Path) -> None:
    library = tmp_path / "sounds"
    for rel in ("rain/light.wav", "rain/heavy.FLAC", "dog.mp3", "birds/dawn/wren.ogg"):
        (library / rel).parent.mkdir(parents=True, exist_ok=True)
        (library / rel).write_bytes(b"audio bytes: decoded later by the ingest")
    (library / "notes.txt").write_text("not audio")
    (library / ".partial.wav").write_bytes(b"an uncommitted upload")
    rows = _rows(kind="audio_files", root=str(library), name="mine", default_split="library")
    assert [r["clip_id"] for r in rows] == [
        "mine/birds/dawn/wren.ogg",
        "mine/dog.mp3",
        "mine/rain/heavy.FLAC",
        "mine/rain/light.wav",
    ]
    assert rows[3]["source_uri"] == f"{library}/rain/light.wav"
    assert {(r["split"], len(r["captions"]), len(r["labels"])) for r in rows} == {("library", 0, 0)}
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="no audio files .* under .*empty"):
        _rows(kind="audio_files", root=str(tmp_path / "empty"))

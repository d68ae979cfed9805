"""AudioInputs: resample + crop + features per tower kind, SpecAugment only in training,
batch padding with true lengths, clip-shard rows, AudioFormer ids from codes."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from gpa_ray.audio.codec import BOA, EOA, PAD
from gpa_ray.audio.features import LogMel
from gpa_ray.audio.inputs import AudioInputError, AudioInputs
from gpa_ray.audio.io import decode_audio, encode_flac, fit_length, resample
from gpa_ray.config import (
    AudioConfig,
    AudioEncoderConfig,
    AudioFormerConfig,
    Config,
    FeaturesConfig,
)
from gpa_ray.models.aisfx_cnn import AisfxFrontEnd


def _cfg(kind: str = "cnn14", max_seconds: float = 1.0, spec_augment: bool = True) -> Config:
    return Config(
        audio=AudioConfig(max_seconds=max_seconds),
        features=FeaturesConfig(n_mels=32),
        audio_encoder=AudioEncoderConfig(kind=kind, spec_augment=spec_augment),
        audioformer=AudioFormerConfig(max_positions=40, codebooks=[1, 0]),
    )


def _tone(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(round(seconds * sr)) / sr
    noise = np.random.default_rng(0).normal(0, 0.01, t.shape)
    return (0.3 * np.sin(2 * math.pi * freq * t) + noise).astype(np.float32)


def test_mel_inputs_are_logmel_of_the_resampled_start_crop() -> None:
    cfg = _cfg(max_seconds=1.0)
    inputs = AudioInputs.from_config(cfg)
    wave = _tone(1.5, 44100)
    out = inputs.from_waveform(wave, 44100)
    expected_wave = resample(wave, 44100, 32000)[:32000]
    expected = LogMel(cfg.features)(torch.from_numpy(expected_wave)[None])[0]
    # 1 s at 32 kHz, hop 320: 1 + 32000 // 320 = 101 frames of 32 mel bins.
    assert out["logmel"].shape == (101, 32) and int(out["lengths"]) == 101
    torch.testing.assert_close(out["logmel"], expected)


def test_length_policy_pads_short_clips_only_when_asked() -> None:
    wave = _tone(0.5, 32000)
    cropped = AudioInputs.from_config(_cfg(max_seconds=1.0)).from_waveform(wave, 32000)
    padded_cfg = dataclasses.replace(
        _cfg(max_seconds=1.0), audio=AudioConfig(max_seconds=1.0, length_policy="pad_or_crop")
    )
    padded = AudioInputs.from_config(padded_cfg).from_waveform(wave, 32000)
    # 0.5 s -> 1 + 16000 // 320 = 51 frames; zero-padded to 1 s -> 101 frames: the
    # log-mel of the clip followed by 0.5 s of silence.
    assert int(cropped["lengths"]) == 51 and int(padded["lengths"]) == 101
    expected = np.pad(wave, (0, 16000))
    reference = LogMel(padded_cfg.features)(torch.from_numpy(expected)[None])[0]
    torch.testing.assert_close(padded["logmel"], reference)
    bad = dataclasses.replace(padded_cfg, audio=AudioConfig(length_policy="none"))
    with pytest.raises(ValueError, match="audio.length_policy 'none'"):
        AudioInputs.from_config(bad)
    codes_cfg = dataclasses.replace(
        _cfg("audioformer"), audio=AudioConfig(length_policy="pad_or_crop")
    )
    with pytest.raises(ValueError, match="must be 'crop' for the audioformer"):
        AudioInputs.from_config(codes_cfg)


def test_training_crop_is_random_per_seed_and_reproducible() -> None:
    cfg = _cfg(max_seconds=1.0, spec_augment=False)
    inputs = AudioInputs.from_config(cfg)
    wave = np.random.default_rng(1).normal(0, 0.1, 3 * 32000).astype(np.float32)
    a = inputs.from_waveform(wave, 32000, train=True, seed=5)["logmel"]
    again = inputs.from_waveform(wave, 32000, train=True, seed=5)["logmel"]
    other = inputs.from_waveform(wave, 32000, train=True, seed=6)["logmel"]
    torch.testing.assert_close(a, again)
    assert not torch.allclose(a, other)
    window = fit_length(wave, 32000, "crop", "random", 5)
    torch.testing.assert_close(a, LogMel(cfg.features)(torch.from_numpy(window)[None])[0])


def test_spec_augment_only_when_training() -> None:
    inputs = AudioInputs.from_config(_cfg("resnet50", max_seconds=2.0))
    wave = _tone(2.0, 32000)
    clean = inputs.from_waveform(wave, 32000)["logmel"]
    assert torch.equal(inputs.from_waveform(wave, 32000, seed=3)["logmel"], clean)
    augmented = inputs.from_waveform(wave, 32000, train=True, seed=3)["logmel"]
    assert augmented.shape == clean.shape and not torch.equal(augmented, clean)
    # Masks write exact zeros; a tone with noise has no exact-zero log-mel values.
    assert (clean == 0).sum() == 0 and (augmented == 0).sum() > 0
    no_aug = AudioInputs.from_config(_cfg("resnet50", max_seconds=2.0, spec_augment=False))
    assert torch.equal(no_aug.from_waveform(wave, 32000, train=True, seed=3)["logmel"], clean)


@pytest.mark.parametrize("kind", ["cnn14", "resnet38"])
def test_panns_towers_inputs_are_only_time_stretched(kind: str) -> None:
    """CNN14 / ResNet38 mask after their bn0 (tests/models/test_audio_cnn.py): their
    training inputs carry no 0 dB stripes, only the time stretch, and none without it."""
    wave = _tone(2.0, 32000)
    inputs = AudioInputs.from_config(_cfg(kind, max_seconds=2.0))
    clean = inputs.from_waveform(wave, 32000)["logmel"]
    for seed in range(5):
        augmented = inputs.from_waveform(wave, 32000, train=True, seed=seed)["logmel"]
        assert (augmented == 0).sum() == 0
    assert not torch.equal(augmented, clean)  # stretched
    cfg = _cfg(kind, max_seconds=2.0)
    no_stretch = dataclasses.replace(
        cfg, features=dataclasses.replace(cfg.features, time_stretch_min=1, time_stretch_max=1)
    )
    inputs = AudioInputs.from_config(no_stretch)
    assert torch.equal(inputs.from_waveform(wave, 32000, train=True, seed=3)["logmel"], clean)


def test_short_clips_are_not_padded_until_collate() -> None:
    cfg = _cfg(max_seconds=2.0)
    inputs = AudioInputs.from_config(cfg)
    short = inputs.from_waveform(_tone(0.05, 32000), 32000)  # 1 + 1600 // 320 = 6 frames
    longer = inputs.from_waveform(_tone(0.5, 32000), 32000)  # 1 + 16000 // 320 = 51 frames
    assert short["logmel"].shape[0] == 6 and longer["logmel"].shape[0] == 51
    batch = inputs.collate([short, longer])
    assert batch["logmel"].shape == (2, 51, 32)
    assert batch["lengths"].tolist() == [6, 51]
    torch.testing.assert_close(batch["logmel"][0, :6], short["logmel"])
    silence = 10.0 * math.log10(cfg.features.log_floor)  # -100 dB: log-mel of zeros
    assert torch.all(batch["logmel"][0, 6:] == silence)
    # A batch of only very short clips is padded to the 32 frames a CNN14 needs.
    tiny = inputs.collate([short])
    assert tiny["logmel"].shape == (1, 32, 32) and tiny["lengths"].tolist() == [6]


def test_aisfx_inputs_use_its_front_end_at_44k() -> None:
    inputs = AudioInputs.from_config(_cfg("aisfx", max_seconds=1.0))
    wave = _tone(1.2, 32000)
    out = inputs.from_waveform(wave, 32000)
    expected, _ = AisfxFrontEnd()(torch.from_numpy(resample(wave, 32000, 44100)[:44100])[None])
    # ceil(44100 / 1024) + 1 = 45 Essentia frames of 96 bands.
    assert out["spec"].shape == (45, 96) and int(out["lengths"]) == 45
    torch.testing.assert_close(out["spec"], expected[0])
    batch = inputs.collate([inputs.from_waveform(wave[:3200], 32000), out])
    # 0.1 s at 44.1 kHz = 4410 samples: ceil(4410 / 1024) + 1 = 6 frames; padding is 0,
    # the aisfx value of silence.
    assert batch["lengths"].tolist() == [6, 45] and torch.all(batch["spec"][0, 6:] == 0)


def test_aisfx_spec_augment_widths_are_rescaled() -> None:
    inputs = AudioInputs.from_config(_cfg("aisfx"))
    # PANNs frames last 320 / 32000 = 10 ms, aisfx frames 1024 / 44100 = 23.22 ms:
    # 64 frames = 0.64 s = 27.56 -> 28 aisfx frames; 8 of the config's 32 mel bins (a
    # quarter of the spectrum) = 24 of aisfx's 96 bands.
    assert inputs.augment.time_mask_width == 28
    assert inputs.augment.freq_mask_width == 24
    assert inputs.augment.pad_value == 0.0


def test_audioformer_ids_from_codes_crop_and_collate() -> None:
    inputs = AudioInputs.from_config(_cfg("audioformer", max_seconds=10.0))
    codes = np.arange(2 * 50, dtype=np.int16).reshape(2, 50)
    out = inputs.from_codes(codes)
    # Codebook audioformer.codebooks[0] = 1; max_positions 40 leaves 38 code frames.
    assert out["input_ids"].tolist() == [BOA, *[c + 3 for c in range(50, 88)], EOA]
    assert torch.all(out["attention_mask"] == 1)
    short = inputs.from_codes(codes[:, :5])
    batch = inputs.collate([short, out])
    assert batch["input_ids"].shape == (2, 40)
    assert batch["input_ids"][0].tolist() == [BOA, 53, 54, 55, 56, 57, EOA] + [PAD] * 33
    assert batch["attention_mask"][0].tolist() == [1] * 7 + [0] * 33
    with pytest.raises(AudioInputError, match="codebook 1"):
        inputs.from_codes(codes[:1])


@pytest.mark.slow
def test_audioformer_waveform_queries_go_through_the_codec() -> None:
    cfg = dataclasses.replace(_cfg("audioformer", max_seconds=0.4))
    inputs = AudioInputs.from_config(cfg)
    with pytest.warns(UserWarning, match="RANDOM"):
        out = inputs.from_waveform(_tone(1.0, 16000), 16000)
    # 0.4 s at 24 kHz = 9600 samples -> ceil(9600 * 75 / 24000) = 30 code frames.
    codes = inputs.tokenizer.encode([resample(_tone(1.0, 16000), 16000, 24000)[:9600]])[0]
    assert out["input_ids"].tolist() == [BOA, *(codes[1].astype(int) + 3).tolist(), EOA]


def test_rows_decode_flac_or_read_codes() -> None:
    inputs = AudioInputs.from_config(_cfg(max_seconds=1.0))
    wave = _tone(0.5, 32000)
    row = {"clip_id": "c/1", "audio": encode_flac(wave, 32000)}
    decoded, sr = decode_audio(row["audio"], "c/1")
    assert sr == 32000 and np.abs(decoded - wave).max() < 1e-4  # 16-bit FLAC
    torch.testing.assert_close(inputs.from_row(row), inputs.from_waveform(decoded, sr))
    with pytest.raises(AudioInputError, match="'c/2' has no stored audio"):
        inputs.from_row({"clip_id": "c/2", "audio": None})
    former = AudioInputs.from_config(_cfg("audioformer"))
    codes = [[1, 2, 3], [4, 5, 6]]
    assert former.from_row({"clip_id": "c/3", "codes": codes})["input_ids"].tolist() == [
        BOA,
        7,
        8,
        9,
        EOA,
    ]
    with pytest.raises(AudioInputError, match="reads audio, not codes"):
        inputs.from_codes(np.zeros((4, 3)))

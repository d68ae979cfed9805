"""The linear log spectrogram (`features.scale=linear`) and centred zero padding
(`audio.pad=center`), the "Good, Fast, Cheap" input, against plain NumPy references."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.audio.io import fit_length
from gpa_ray.audio.spectrogram import LogLinear, build_frontend, input_bins
from gpa_ray.config import AudioConfig, AudioEncoderConfig, Config, FeaturesConfig

SMALL = FeaturesConfig(scale="linear", sample_rate=8000, n_fft=64, hop_length=16)


def loop_log_spectrogram(wave: np.ndarray, n_fft: int, hop: int, floor: float) -> np.ndarray:
    """Centred reflect-padded STFT, periodic Hann, |X_k|^2 by an explicit DFT sum, in dB."""
    padded = np.pad(wave.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames = 1 + len(wave) // hop
    n = np.arange(n_fft)
    out = np.zeros((frames, n_fft // 2 + 1))
    for t in range(frames):
        segment = padded[t * hop : t * hop + n_fft] * window
        for k in range(n_fft // 2 + 1):
            x = np.sum(segment * np.exp(-2j * np.pi * k * n / n_fft))
            out[t, k] = 10 * np.log10(max(abs(x) ** 2, floor))
    return out


def test_log_linear_is_the_dft_power_in_db() -> None:
    rng = np.random.default_rng(0)
    wave = rng.standard_normal(200).astype(np.float32) * 0.3
    got = LogLinear(SMALL)(torch.from_numpy(wave)[None])[0].numpy()
    expected = loop_log_spectrogram(wave, 64, 16, SMALL.log_floor)
    assert got.shape == (1 + 200 // 16, 33) == expected.shape
    np.testing.assert_allclose(got, expected, atol=2e-3)


def test_linear_bins_reach_nyquist_where_mel_stops_at_fmax() -> None:
    # A 3.9 kHz tone at 8 kHz: above the mel default fmax would not matter here, but every
    # linear bin is kept, so the tone's bin (3900 / 125 = bin 31.2) carries the peak.
    t = np.arange(800) / 8000
    wave = np.sin(2 * np.pi * 3900 * t).astype(np.float32)
    spec = LogLinear(SMALL)(torch.from_numpy(wave)[None])[0]
    assert int(spec.mean(0).argmax()) == 31
    assert input_bins(SMALL) == 33 and input_bins(FeaturesConfig()) == 64
    with pytest.raises(ValueError, match="features.scale 'bark'"):
        build_frontend(dataclasses.replace(SMALL, scale="bark"))


def test_centred_zero_padding() -> None:
    wave = np.array([1.0, 2.0, 3.0], dtype=np.float32)
    assert fit_length(wave, 8, "pad_or_crop", "start", pad="center").tolist() == [
        0, 0, 1, 2, 3, 0, 0, 0,
    ]  # fmt: skip
    assert fit_length(wave, 8, "pad_or_crop", "start").tolist() == [1, 2, 3, 0, 0, 0, 0, 0]
    with pytest.raises(ValueError, match="pad mode 'left'"):
        fit_length(wave, 8, "pad_or_crop", "start", pad="left")


def test_tower_inputs_centre_the_clip_in_silence() -> None:
    cfg = Config(
        audio=AudioConfig(max_seconds=1.0, length_policy="pad_or_crop", pad="center"),
        features=SMALL,
        audio_encoder=AudioEncoderConfig(kind="resnet50", spec_augment=False),
    )
    inputs = AudioInputs(cfg)
    tone = np.sin(2 * np.pi * 1000 * np.arange(4000) / 8000).astype(np.float32)  # 0.5 s
    spec = inputs.from_waveform(tone, 8000, train=True, seed=3)["logmel"]
    assert spec.shape == (1 + 8000 // 16, 33)
    energy = spec.max(dim=1).values
    floor = 10 * np.log10(SMALL.log_floor)
    # 0.25 s of silence on each side: 125 frames, minus the window's reach.
    assert torch.all(energy[:120] == floor) and torch.all(energy[-120:] == floor)
    assert torch.all(energy[130:-130] > -10)

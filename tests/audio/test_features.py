"""Log-mel against a plain numpy reference; SpecAugment masks, stretch, eval, determinism."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torchaudio

from gpa_ray.audio.features import AugmentParams, LogMel, SpecAugment
from gpa_ray.config import FeaturesConfig

CFG = FeaturesConfig()


def _slaney_hz_to_mel(f: float) -> float:
    """librosa/Slaney mel scale: linear 3 bins per 200 Hz below 1 kHz, log above."""
    if f < 1000.0:
        return 3.0 * f / 200.0
    return 15.0 + 27.0 * math.log(f / 1000.0) / math.log(6.4)


def _slaney_mel_to_hz(m: float) -> float:
    if m < 15.0:
        return 200.0 * m / 3.0
    return 1000.0 * math.exp((m - 15.0) * math.log(6.4) / 27.0)


def _numpy_log_mel(wave: np.ndarray, cfg: FeaturesConfig) -> np.ndarray:
    """Reference: centred reflect-padded STFT, periodic Hann, |X|^2, Slaney mel, 10*log10."""
    n_fft, hop = cfg.n_fft, cfg.hop_length
    padded = np.pad(wave.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n_frames = 1 + (len(padded) - n_fft) // hop
    frames = np.stack([padded[t * hop : t * hop + n_fft] * window for t in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    fbank = torchaudio.functional.melscale_fbanks(
        n_fft // 2 + 1, cfg.fmin, cfg.fmax, cfg.n_mels, cfg.sample_rate, "slaney", "slaney"
    ).double()
    mel = power @ fbank.numpy()
    return 10.0 * np.log10(np.maximum(mel, cfg.log_floor))


def test_log_mel_shape_and_frame_count() -> None:
    logmel = LogMel(CFG)
    # Centred STFT: 1 + n_samples // hop frames; 1 s at 32 kHz -> 101, 10 s -> 1001.
    assert logmel(torch.zeros(2, 32000)).shape == (2, 101, 64)
    assert logmel(torch.zeros(1, 320000)).shape == (1, 1001, 64)
    assert logmel.n_frames(320000) == 1001
    with pytest.raises(ValueError, match="batch, samples"):
        logmel(torch.zeros(32000))


def test_log_mel_matches_numpy_reference() -> None:
    rng = np.random.default_rng(0)
    waves = (0.1 * rng.standard_normal((2, 16000))).astype(np.float32)
    waves[1, :8000] *= 10.0  # a loud half, so the dB range is wide
    got = LogMel(CFG)(torch.from_numpy(waves)).double().numpy()
    for b in range(2):
        np.testing.assert_allclose(got[b], _numpy_log_mel(waves[b], CFG), atol=1e-4, rtol=0)


def test_silence_sits_on_the_floor() -> None:
    # 10*log10(1e-10) = -100 dB exactly.
    out = LogMel(CFG)(torch.zeros(1, 3200))
    assert torch.all(out == -100.0)


def test_tone_peaks_in_its_mel_bin() -> None:
    # Mel bin centres: n_mels + 2 points equally spaced on the Slaney scale from fmin to fmax.
    lo, hi = _slaney_hz_to_mel(CFG.fmin), _slaney_hz_to_mel(CFG.fmax)
    step = (hi - lo) / (CFG.n_mels + 1)
    for target in (10, 30, 50):
        freq = _slaney_mel_to_hz(lo + (target + 1) * step)
        t = np.arange(CFG.sample_rate) / CFG.sample_rate
        tone = np.sin(2 * np.pi * freq * t).astype(np.float32)[None]
        out = LogMel(CFG)(torch.from_numpy(tone))
        assert int(out[0].mean(0).argmax()) == target, (target, freq)


def _params(
    stretch: list[float], time_masks: list[list[list[int]]], freq_masks: list[list[list[int]]]
) -> AugmentParams:
    return AugmentParams(
        stretch=torch.tensor(stretch, dtype=torch.float64),
        time_masks=torch.tensor(time_masks, dtype=torch.int64),
        freq_masks=torch.tensor(freq_masks, dtype=torch.int64),
    )


def test_spec_augment_masks_zero_exactly_the_stripes() -> None:
    cfg = replace(CFG, time_stretch_min=1.0, time_stretch_max=1.0)
    aug = SpecAugment(cfg).train()
    batch, frames, mels = 4, 200, 64
    spec = torch.rand(batch, frames, mels) + 1.0  # no zeros before masking
    params = aug.sample_params(batch, frames, mels, torch.Generator().manual_seed(3))
    out = aug.apply(spec, params)
    for b in range(batch):
        zero_t: set[int] = set()
        for start, width in params.time_masks[b].tolist():
            assert 0 <= width <= cfg.time_mask_width and start + width <= frames
            zero_t.update(range(start, start + width))
        zero_f: set[int] = set()
        for start, width in params.freq_masks[b].tolist():
            assert 0 <= width <= cfg.freq_mask_width and start + width <= mels
            zero_f.update(range(start, start + width))
        expected = len(zero_t) * mels + len(zero_f) * frames - len(zero_t) * len(zero_f)
        assert int((out[b] == 0).sum()) == expected
        keep = torch.ones(frames, mels, dtype=torch.bool)
        keep[sorted(zero_t), :] = False
        keep[:, sorted(zero_f)] = False
        assert torch.equal(out[b][keep], spec[b][keep])


def test_spec_augment_hand_written_stripes() -> None:
    aug = SpecAugment(CFG)
    spec = torch.ones(1, 10, 6)
    # Time stripes [2, 5) and [4, 6) overlap -> frames 2..5 zeroed (4 frames);
    # frequency stripe [1, 3) -> 2 bins. Zeros = 4*6 + 2*10 - 4*2 = 36.
    out = aug.apply(spec, _params([1.0], [[[2, 3], [4, 2]]], [[[1, 2]]]))
    assert int((out == 0).sum()) == 36
    assert torch.all(out[0, 2:6] == 0) and torch.all(out[0, :, 1:3] == 0)
    assert torch.all(out[0, [0, 1, 6, 7, 8, 9]][:, [0, 3, 4, 5]] == 1)


def test_time_stretch_by_hand() -> None:
    aug = SpecAugment(CFG)
    ramp = torch.arange(10, dtype=torch.float32).reshape(1, 10, 1)
    # Linear interpolation, align_corners=False: output i samples input (i + 0.5)/r - 0.5,
    # clamped to [0, 9].
    slow = aug.stretch(ramp, torch.tensor([2.0]))[0, :, 0]
    # r = 2: sources -0.25, 0.25, 0.75, ..., 4.25 -> 0, 0.25, 0.75, ..., 4.25.
    np.testing.assert_allclose(
        slow.numpy(), [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3.25, 3.75, 4.25]
    )
    fast = aug.stretch(ramp, torch.tensor([0.5]))[0, :, 0]
    # r = 0.5: 5 frames from sources 0.5, 2.5, 4.5, 6.5, 8.5; then padded with the log-mel
    # of silence, 10*log10(1e-10) = -100.
    np.testing.assert_allclose(fast.numpy(), [0.5, 2.5, 4.5, 6.5, 8.5] + [-100.0] * 5)


def test_spec_augment_eval_is_identity() -> None:
    aug = SpecAugment(CFG).eval()
    spec = torch.randn(2, 100, 64)
    assert aug(spec, torch.Generator().manual_seed(0)) is spec


def test_spec_augment_is_seeded() -> None:
    aug = SpecAugment(CFG).train()
    spec = torch.randn(3, 300, 64)
    a = aug(spec, torch.Generator().manual_seed(11))
    b = aug(spec, torch.Generator().manual_seed(11))
    c = aug(spec, torch.Generator().manual_seed(12))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == spec.shape
    assert not torch.equal(a, spec)

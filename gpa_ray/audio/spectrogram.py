"""The spectrogram front end a tower sees, by `features.scale`: PANNs log-mel, or the
linear-frequency log spectrogram "Good, Fast, Cheap" feeds its image towers (section 3:
mel "may remove informative data about certain sounds, especially at the higher range
of the frequency spectrum").

Both use the same STFT (centred, reflect-padded, periodic Hann, `n_fft` / `hop_length`)
and the same `10*log10(max(S, floor))` scale, so they differ only in the frequency axis:
`features.n_mels` mel bands, or all n_fft / 2 + 1 linear bins from 0 Hz to Nyquist.
"""

from __future__ import annotations

import torch
import torchaudio

from gpa_ray.audio.features import LogMel
from gpa_ray.config import FeaturesConfig

SCALES = ("mel", "linear")


class LogLinear(torch.nn.Module):
    """Waveforms [B, n_samples] -> log power spectrogram [B, frames, n_fft / 2 + 1] in dB."""

    def __init__(self, cfg: FeaturesConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or FeaturesConfig()
        self.sample_rate = cfg.sample_rate
        self.hop_length = cfg.hop_length
        self.n_bins = cfg.n_fft // 2 + 1
        self.log_floor = cfg.log_floor
        self.stft = torchaudio.transforms.Spectrogram(
            n_fft=cfg.n_fft,
            win_length=cfg.n_fft,
            hop_length=cfg.hop_length,
            window_fn=torch.hann_window,
            power=2.0,
            center=True,
            pad_mode="reflect",
        )

    def n_frames(self, n_samples: int) -> int:
        """Frame count for a waveform of `n_samples` samples (centred STFT)."""
        return 1 + n_samples // self.hop_length

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        if waves.dim() != 2:
            raise ValueError(f"LogLinear expects [batch, samples], got shape {tuple(waves.shape)}")
        power = self.stft(waves.float())
        return 10.0 * torch.log10(power.clamp(min=self.log_floor)).transpose(1, 2)


def input_bins(cfg: FeaturesConfig) -> int:
    """Frequency bins of the front end's output: the towers' input height."""
    return cfg.n_mels if cfg.scale == "mel" else cfg.n_fft // 2 + 1


def build_frontend(cfg: FeaturesConfig) -> torch.nn.Module:
    """`LogMel` or `LogLinear`, by `features.scale`."""
    if cfg.scale == "mel":
        return LogMel(cfg)
    if cfg.scale == "linear":
        return LogLinear(cfg)
    raise ValueError(f"unknown features.scale {cfg.scale!r}; choose one of {SCALES}")

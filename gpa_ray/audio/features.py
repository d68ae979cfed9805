"""Log-mel front end with PANNs settings, and SpecAugment for training.

Log-mel is computed on the fly from stored FLAC (storing mel for millions of clips costs
far more than the audio). The settings reproduce PANNs (torchlibrosa): a centred,
reflect-padded STFT with a periodic Hann window, librosa's Slaney mel filterbank, and
`10*log10(max(S, floor))` (power_to_db with ref 1.0, no top_db), so PANNs-family
checkpoints see the input they were trained on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchaudio

from gpa_ray.config import FeaturesConfig


class LogMel(torch.nn.Module):
    """Waveforms [B, n_samples] -> log-mel [B, frames, n_mels] in dB.

    frames = 1 + n_samples // hop_length (centred STFT).
    """

    def __init__(self, cfg: FeaturesConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or FeaturesConfig()
        self.sample_rate = cfg.sample_rate
        self.hop_length = cfg.hop_length
        self.n_mels = cfg.n_mels
        self.log_floor = cfg.log_floor
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=cfg.sample_rate,
            n_fft=cfg.n_fft,
            win_length=cfg.n_fft,
            hop_length=cfg.hop_length,
            f_min=cfg.fmin,
            f_max=cfg.fmax,
            n_mels=cfg.n_mels,
            window_fn=torch.hann_window,
            power=2.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )

    def n_frames(self, n_samples: int) -> int:
        """Frame count for a waveform of `n_samples` samples."""
        return 1 + n_samples // self.hop_length

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        if waves.dim() != 2:
            raise ValueError(f"LogMel expects [batch, samples], got shape {tuple(waves.shape)}")
        power = self.mel(waves.float())
        return 10.0 * torch.log10(power.clamp(min=self.log_floor)).transpose(1, 2)


@dataclass(frozen=True)
class AugmentParams:
    """The random draws of one SpecAugment call, kept apart so they can be inspected.

    stretch: [B] time-stretch factors; time_masks / freq_masks: [B, n_masks, 2] int64 rows of
    (start, width) on the stretched spectrogram.
    """

    stretch: torch.Tensor
    time_masks: torch.Tensor
    freq_masks: torch.Tensor


def _draw_masks(
    batch: int, n_masks: int, max_width: int, length: int, generator: torch.Generator | None
) -> torch.Tensor:
    """(start, width) rows: width uniform in [0, max_width], stripe inside [0, length)."""
    out = torch.zeros(batch, n_masks, 2, dtype=torch.int64)
    cap = min(max_width, length)
    for b in range(batch):
        for m in range(n_masks):
            width = int(torch.randint(0, cap + 1, (1,), generator=generator))
            start = int(torch.randint(0, length - width + 1, (1,), generator=generator))
            out[b, m, 0] = start
            out[b, m, 1] = width
    return out


class SpecAugment(torch.nn.Module):
    """Time stretch, then time and frequency masking, on log-mel [B, frames, mels].

    Training only: in eval mode the input is returned unchanged. Time stretch resamples
    the time axis by a factor r (linear interpolation; r > 1 slows the sound down) and
    crops or pads back to the input length; padding uses the log-mel of silence
    (10*log10(log_floor)), which is what a shorter zero-padded clip would show. Masked
    stripes are set to zero, as in PANNs' SpecAugmentation.
    """

    def __init__(self, cfg: FeaturesConfig | None = None) -> None:
        super().__init__()
        cfg = cfg or FeaturesConfig()
        if not 0 < cfg.time_stretch_min <= cfg.time_stretch_max:
            raise ValueError(
                f"time stretch range must satisfy 0 < min <= max, got "
                f"[{cfg.time_stretch_min}, {cfg.time_stretch_max}]"
            )
        self.time_masks = cfg.time_masks
        self.time_mask_width = cfg.time_mask_width
        self.freq_masks = cfg.freq_masks
        self.freq_mask_width = cfg.freq_mask_width
        self.stretch_min = cfg.time_stretch_min
        self.stretch_max = cfg.time_stretch_max
        self.pad_value = 10.0 * math.log10(cfg.log_floor)

    def sample_params(
        self, batch: int, frames: int, n_mels: int, generator: torch.Generator | None = None
    ) -> AugmentParams:
        """Draw stretch factors and mask stripes for a batch."""
        u = torch.rand(batch, generator=generator, dtype=torch.float64)
        stretch = self.stretch_min + (self.stretch_max - self.stretch_min) * u
        time_masks = _draw_masks(batch, self.time_masks, self.time_mask_width, frames, generator)
        freq_masks = _draw_masks(batch, self.freq_masks, self.freq_mask_width, n_mels, generator)
        return AugmentParams(stretch=stretch, time_masks=time_masks, freq_masks=freq_masks)

    def stretch(self, spec: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
        """Resample each example's time axis by its factor, then crop/pad to the input length."""
        frames = spec.shape[1]
        out = torch.full_like(spec, self.pad_value)
        for b in range(spec.shape[0]):
            factor = float(factors[b])
            if factor == 1.0:
                out[b] = spec[b]
                continue
            new_len = max(1, round(frames * factor))
            resized = F.interpolate(
                spec[b].T.unsqueeze(0), size=new_len, mode="linear", align_corners=False
            )[0].T
            keep = min(new_len, frames)
            out[b, :keep] = resized[:keep]
        return out

    def apply(self, spec: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        """Apply drawn parameters: stretch, then zero the time and frequency stripes."""
        out = self.stretch(spec, params.stretch)
        for b in range(out.shape[0]):
            for start, width in params.time_masks[b].tolist():
                out[b, start : start + width, :] = 0.0
            for start, width in params.freq_masks[b].tolist():
                out[b, :, start : start + width] = 0.0
        return out

    def forward(self, spec: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if not self.training:
            return spec
        if spec.dim() != 3:
            raise ValueError(
                f"SpecAugment expects [batch, frames, mels], got shape {tuple(spec.shape)}"
            )
        batch, frames, n_mels = spec.shape
        return self.apply(spec, self.sample_params(batch, frames, n_mels, generator))

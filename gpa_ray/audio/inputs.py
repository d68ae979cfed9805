"""The one audio preprocessing path from a waveform (or codes) to what an audio tower eats.

Training, evaluation, the bias job, index building and the Serve audio endpoint all turn
audio into tower inputs here, so a model never sees features computed differently at
training and at query time. Decoding bytes is the caller's job (`gpa_ray.audio.io`),
except for clip-shard rows (`from_row`), whose FLAC bytes are decoded here.

Per clip, `from_waveform`:

1. resamples to the tower's rate (`features.sample_rate` for log-mel towers, 44.1 kHz
   for aisfx, 24 kHz for AudioFormer's EnCodec tokenizer);
2. crops to `audio.max_seconds`: a random window when training (drawn from `seed`),
   else `audio.crop` (default the start). With `audio.length_policy` "crop" (default)
   shorter clips keep their length: `collate` pads per batch and passes the true
   lengths, so padding never counts as audio in pooling; "pad_or_crop" zero-pads them
   to `audio.max_seconds` first (fixed-length inputs, as PANNs train), at the end or
   around the centred clip (`audio.pad`);
3. computes the tower's input: PANNs log-mel [T, n_mels] for cnn14/resnet38/resnet50/vit
   (with `features.scale` "linear", the log spectrogram [T, n_fft / 2 + 1]),
   the aisfx front end [T, 96] for aisfx, token ids `[BOA] c+3 ... [EOA]` of codebook
   `audioformer.codebooks[0]` for audioformer (via EnCodec, or `from_codes`);
4. when training, applies SpecAugment (`features.*`, if `audio_encoder.spec_augment`) to
   the spectrogram, seeded by `seed`: time stretch and masks for resnet50/vit/aisfx
   (stripes set to 0 in the input's scale), time stretch only for cnn14/resnet38, whose
   masks the tower applies after its input batch norm (`MASKED_IN_TOWER`).

`collate` pads a list of per-clip dicts to a batch whose keys are the tower's keyword
arguments (`logmel`/`spec` + `lengths`, or `input_ids` + `attention_mask`), which
`GPAModel.embed_audio(batch)` passes on.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gpa_ray.audio.codec import CODEC_SAMPLE_RATE, FRAME_RATE, PAD, to_token_ids
from gpa_ray.audio.features import SpecAugment
from gpa_ray.audio.io import decode_audio, fit_length, resample
from gpa_ray.audio.spectrogram import build_frontend
from gpa_ray.config import Config

MEL_KINDS = ("cnn14", "resnet38", "resnet50", "vit", "vit_b16")
"""Towers fed with PANNs log-mel (`gpa_ray.audio.features.LogMel`)."""
KINDS = (*MEL_KINDS, "aisfx", "audioformer")
"""Every `audio_encoder.kind`."""
MASKED_IN_TOWER = ("cnn14", "resnet38")
"""Towers that draw SpecAugment's stripes themselves, on the output of `bn0` (PANNs, and the
DP baseline GPA follows: masked bins become 0 = the per-bin mean after normalisation, see
`gpa_ray.models.audio_cnn.StripeMasks`); here their inputs are only time stretched."""
WAVEFORM_POLICIES = ("crop", "pad_or_crop")
"""`audio.length_policy` values (see `gpa_ray.audio.io.fit_length`)."""
MIN_FRAMES = {"mel": 32, "aisfx": 8}
"""Shortest spectrogram a tower accepts (CNN14/ResNet halve time 5 times, aisfx 3 times)."""


class AudioInputError(ValueError):
    """A clip cannot be turned into tower inputs (e.g. a row without audio or codes)."""


def window_spans(duration_s: float, window_s: float, hop_s: float) -> list[tuple[float, float]]:
    """(start, end) seconds of the windows that cover a clip: one span for a clip no
    longer than the window, else windows every `hop_s` until one reaches the end (the
    last may be shorter)."""
    if window_s <= 0 or hop_s <= 0:
        raise ValueError(f"window ({window_s} s) and hop ({hop_s} s) must be positive")
    if duration_s <= window_s:
        return [(0.0, float(duration_s))]
    count = math.ceil((duration_s - window_s) / hop_s - 1e-9) + 1
    return [(i * hop_s, min(i * hop_s + window_s, float(duration_s))) for i in range(count)]


def _seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) % 2**63)


class AudioInputs:
    """Waveforms/codes -> per-clip tower inputs -> padded batches, for one tower kind."""

    def __init__(self, cfg: Config) -> None:
        kind = cfg.audio_encoder.kind
        if kind not in KINDS:
            raise ValueError(f"unknown audio_encoder.kind {kind!r}; choose one of {KINDS}")
        self.cfg = cfg
        self.kind = kind
        self.family = "mel" if kind in MEL_KINDS else kind
        self.max_seconds = cfg.audio.max_seconds
        self.crop = cfg.audio.crop
        self.length_policy = cfg.audio.length_policy
        if self.length_policy not in WAVEFORM_POLICIES:
            raise ValueError(
                f"audio.length_policy {self.length_policy!r}: choose one of {WAVEFORM_POLICIES}"
            )
        if kind == "audioformer" and self.length_policy != "crop":
            raise ValueError(
                "audio.length_policy must be 'crop' for the audioformer tower: it reads "
                "EnCodec codes of the clip's own length (zero-padded audio would add codes)"
            )
        self.spec_augment = cfg.audio_encoder.spec_augment
        self._tokenizer: Any = None
        if self.family == "mel":
            self.sample_rate = cfg.features.sample_rate
            self.frontend: torch.nn.Module = build_frontend(cfg.features)
            feats = cfg.features
            if kind in MASKED_IN_TOWER:
                feats = dataclasses.replace(feats, time_masks=0, freq_masks=0)
            self.augment = SpecAugment(feats)
            self.pad_value = 10.0 * math.log10(cfg.features.log_floor)
        elif self.family == "aisfx":
            from gpa_ray.models.aisfx_cnn import (
                HOP_SIZE,
                N_MELS,
                SAMPLE_RATE,
                AisfxFrontEnd,
            )

            self.sample_rate = SAMPLE_RATE
            self.frontend = AisfxFrontEnd()
            self.augment = SpecAugment(_aisfx_augment_config(cfg, HOP_SIZE / SAMPLE_RATE, N_MELS))
            self.pad_value = 0.0
        else:
            self.sample_rate = CODEC_SAMPLE_RATE
            self.codebook = cfg.audioformer.codebooks[0]
            self.max_frames = min(
                cfg.audioformer.max_positions - 2, round(self.max_seconds * FRAME_RATE)
            )
        if self.family != "audioformer":
            self.augment.train()

    @classmethod
    def from_config(cls, cfg: Config) -> AudioInputs:
        return cls(cfg)

    @property
    def needs_codes(self) -> bool:
        """True when the tower reads EnCodec codes (clip rows: `codes`), else audio."""
        return self.family == "audioformer"

    def from_waveform(
        self, wave: np.ndarray | Tensor, sr: int, train: bool = False, seed: int = 0
    ) -> dict[str, Tensor]:
        """One mono waveform at rate `sr` -> this tower's inputs (see the module docstring)."""
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1 or wave.shape[0] == 0:
            raise AudioInputError(f"expected a non-empty mono waveform, got shape {wave.shape}")
        wave = resample(wave, int(sr), self.sample_rate)
        n_max = max(1, round(self.max_seconds * self.sample_rate))
        crop = "random" if train else self.crop
        wave = fit_length(wave, n_max, self.length_policy, crop, seed, self.cfg.audio.pad)
        if self.family == "audioformer":
            codes = self.tokenizer.encode([wave])[0]
            return self.from_codes(codes, train=False)
        with torch.no_grad():
            if self.family == "mel":
                spec = self.frontend(torch.from_numpy(wave)[None])[0]
            else:
                spec = self.frontend(torch.from_numpy(wave)[None])[0][0]
            if train and self.spec_augment:
                spec = self.augment(spec[None], generator=_seeded(seed))[0]
        key = "logmel" if self.family == "mel" else "spec"
        return {key: spec.contiguous(), "lengths": torch.tensor(spec.shape[0])}

    def from_codes(
        self, codes: np.ndarray | Sequence[Sequence[int]], train: bool = False, seed: int = 0
    ) -> dict[str, Tensor]:
        """EnCodec codes [n_q, T] -> AudioFormer ids of the tower's codebook (cropped)."""
        if self.family != "audioformer":
            raise AudioInputError(f"the {self.kind} tower reads audio, not codes")
        codes = np.asarray(codes)
        if codes.ndim != 2 or self.codebook >= codes.shape[0] or codes.shape[1] == 0:
            raise AudioInputError(
                f"need codes [n_q > {self.codebook}, T > 0] for codebook {self.codebook}, "
                f"got shape {codes.shape}"
            )
        row = codes[self.codebook]
        if row.shape[0] > self.max_frames:
            mode = "random" if train else self.crop
            row = fit_length(row, self.max_frames, "crop", mode, seed)
        ids = torch.from_numpy(to_token_ids(row))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def from_row(
        self, row: Mapping[str, Any], train: bool = False, seed: int = 0
    ) -> dict[str, Tensor]:
        """A clip-shard row (`codes`, or FLAC `audio` bytes) -> tower inputs."""
        if self.needs_codes:
            return self.from_codes(_row_codes(row), train, seed)
        return self.from_waveform(*_row_wave(row), train, seed)

    def windows(
        self, wave: np.ndarray | Tensor, sr: int, window_s: float, hop_s: float
    ) -> list[tuple[float, float, dict[str, Tensor]]]:
        """One mono waveform -> (start s, end s, tower inputs) per window
        (`window_spans`): a long file embedded as segments. The waveform is resampled
        once; an AudioFormer tower encodes it once (in chunks: `codec.chunk_s`) and
        reads each window's codes."""
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1 or wave.shape[0] == 0:
            raise AudioInputError(f"expected a non-empty mono waveform, got shape {wave.shape}")
        wave = resample(wave, int(sr), self.sample_rate)
        spans = window_spans(wave.shape[0] / self.sample_rate, window_s, hop_s)
        if self.family == "audioformer":
            codes = self.tokenizer.encode([wave])[0]
            return self._code_windows(codes, spans)
        rate = self.sample_rate
        return [
            (start, end, self.from_waveform(wave[round(start * rate) : round(end * rate)], rate))
            for start, end in spans
        ]

    def _code_windows(
        self, codes: np.ndarray, spans: list[tuple[float, float]]
    ) -> list[tuple[float, float, dict[str, Tensor]]]:
        out = []
        for start, end in spans:
            first = round(start * FRAME_RATE)
            stop = max(first + 1, round(end * FRAME_RATE))
            out.append((start, end, self.from_codes(codes[:, first:stop])))
        return out

    def windows_from_row(
        self, row: Mapping[str, Any], window_s: float, hop_s: float
    ) -> list[tuple[float, float, dict[str, Tensor]]]:
        """`windows` of a clip-shard row (its codes, or its FLAC audio)."""
        if self.needs_codes:
            codes = _row_codes(row)
            spans = window_spans(codes.shape[-1] / FRAME_RATE, window_s, hop_s)
            return self._code_windows(codes, spans)
        return self.windows(*_row_wave(row), window_s, hop_s)

    @property
    def tokenizer(self) -> Any:
        """EnCodec tokenizer (`codec.*`), built on first use: only waveform queries of an
        AudioFormer tower need it (training reads stored codes)."""
        if self._tokenizer is None:
            from gpa_ray.audio.codec import EncodecTokenizer

            self._tokenizer = EncodecTokenizer.from_config(self.cfg.codec, self.cfg.storage)
        return self._tokenizer

    def collate(self, items: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
        """Pad per-clip inputs to one batch; the keys are the tower's keyword arguments."""
        if not items:
            raise AudioInputError("cannot collate an empty batch")
        if self.family == "audioformer":
            ids = [item["input_ids"] for item in items]
            width = max(len(x) for x in ids)
            batch = torch.full((len(ids), width), PAD, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for i, x in enumerate(ids):
                batch[i, : len(x)] = x
                mask[i, : len(x)] = 1
            return {"input_ids": batch, "attention_mask": mask}
        key = "logmel" if self.family == "mel" else "spec"
        specs = [item[key] for item in items]
        frames = max(MIN_FRAMES[self.family], max(s.shape[0] for s in specs))
        out = torch.full((len(specs), frames, specs[0].shape[1]), self.pad_value)
        for i, spec in enumerate(specs):
            out[i, : spec.shape[0]] = spec
        lengths = torch.stack([torch.as_tensor(item["lengths"]) for item in items]).long()
        return {key: out, "lengths": lengths}


def _aisfx_augment_config(cfg: Config, frame_seconds: float, n_mels: int) -> Any:
    """SpecAugment settings carried over to the aisfx spectrogram.

    Mask widths are given for PANNs frames (`features.hop_length` samples) and mel bins, so
    they are rescaled to aisfx's 23 ms frames and 96 bands (same seconds, same share of
    the spectrum). Silence is 0 in aisfx's log10(1 + 1e4 S) scale, so stretch padding uses
    0 (a `log_floor` of 1 gives 10 log10(1) = 0); masks zero stripes as for log-mel.
    """
    feats = cfg.features
    panns_frame = feats.hop_length / feats.sample_rate
    return dataclasses.replace(
        feats,
        log_floor=1.0,
        time_mask_width=max(1, round(feats.time_mask_width * panns_frame / frame_seconds)),
        freq_mask_width=max(1, round(feats.freq_mask_width * n_mels / feats.n_mels)),
    )


def _row_codes(row: Mapping[str, Any]) -> np.ndarray:
    """A clip-shard row's EnCodec codes [4, T]."""
    if row.get("codes") is None:
        raise AudioInputError(f"clip {str(row.get('clip_id', '<clip>'))!r} has no codes")
    return np.asarray(row["codes"], dtype=np.int16)


def _row_wave(row: Mapping[str, Any]) -> tuple[np.ndarray, int]:
    """A clip-shard row's stored FLAC audio, decoded (waveform, sample rate)."""
    name = str(row.get("clip_id", "<clip>"))
    data = row.get("audio")
    if not data:
        raise AudioInputError(
            f"clip {name!r} has no stored audio (ingest with ingest.store_audio=true)"
        )
    return decode_audio(data, name)

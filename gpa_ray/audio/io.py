"""Audio bytes -> mono float32 waveform, resampling, and the pad/crop length policy.

Every corpus reaches the models through `decode_audio`, so a bad file fails here with one
exception type (`AudioDecodeError`) that names the file: ingest records it in its errors
table and moves on instead of crashing or silently storing garbage (a half-read file, a
text page saved as `.wav`, NaN samples).
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf
import torch
import torchaudio

LENGTH_POLICIES = ("pad_or_crop", "crop", "none")
CROP_MODES = ("start", "center", "random")
PAD_MODES = ("end", "center")

# mpg123 estimates an MP3's length from its headers; without an exact frame-count header
# the estimate can be slightly long, so only a larger shortfall counts as truncation.
_MP3_LENGTH_TOLERANCE = 0.01
# A RIFF data chunk of this size means "length unknown" (streamed writers).
_WAV_UNKNOWN_SIZE = 0xFFFFFFFF


class AudioDecodeError(ValueError):
    """Audio bytes that cannot be decoded into a usable waveform; names the source."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"cannot decode audio {source!r}: {reason}")


def _wav_truncation(data: bytes) -> str | None:
    """Why a RIFF/WAVE byte string is cut short, or None if its data chunk is complete.

    libsndfile decodes a truncated WAV "successfully", returning only the samples that are
    present, so truncation is detected by comparing the data chunk's declared size with
    the bytes that follow its header.
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    pos = 12
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack("<I", data[pos + 4 : pos + 8])
        body = pos + 8
        if chunk_id == b"data":
            if size == _WAV_UNKNOWN_SIZE:
                return None
            present = len(data) - body
            if present < size:
                return f"truncated WAV: data chunk declares {size} bytes, {present} present"
            return None
        pos = body + size + (size & 1)
    return "truncated WAV: no complete data chunk"


def decode_audio(data: bytes, source: str) -> tuple[np.ndarray, int]:
    """Decode wav/flac/ogg/mp3 bytes to a mono float32 waveform (channels averaged).

    Returns (waveform [n_samples], sample_rate). Raises `AudioDecodeError` naming `source`
    for empty, unrecognised, truncated, zero-length or non-finite audio.
    """
    if not data:
        raise AudioDecodeError(source, "empty file (0 bytes)")
    reason = _wav_truncation(data)
    if reason is not None:
        raise AudioDecodeError(source, reason)
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            declared = f.frames
            fmt = f.format
            sample_rate = int(f.samplerate)
            frames = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError, ValueError, TypeError, EOFError) as exc:
        raise AudioDecodeError(source, f"{type(exc).__name__}: {exc}") from exc
    n_read = frames.shape[0]
    if n_read == 0:
        raise AudioDecodeError(source, "zero-length audio (no samples)")
    tolerance = int(declared * _MP3_LENGTH_TOLERANCE) if fmt == "MP3" else 0
    if n_read < declared - tolerance:
        raise AudioDecodeError(
            source, f"truncated {fmt}: header declares {declared} frames, {n_read} decoded"
        )
    if sample_rate <= 0:
        raise AudioDecodeError(source, f"invalid sample rate {sample_rate}")
    wave = frames.mean(axis=1, dtype=np.float32)
    if not np.all(np.isfinite(wave)):
        raise AudioDecodeError(source, "non-finite samples (NaN or inf)")
    return np.ascontiguousarray(wave, dtype=np.float32), sample_rate


def resample(wave: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """Band-limited sinc resampling (torchaudio); float32 out, the input itself if rates match."""
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == target_sr:
        return wave
    if orig_sr <= 0 or target_sr <= 0:
        raise ValueError(f"sample rates must be positive, got {orig_sr} -> {target_sr}")
    out = torchaudio.functional.resample(torch.from_numpy(wave), int(orig_sr), int(target_sr))
    return out.numpy().astype(np.float32, copy=False)


def _crop(wave: np.ndarray, n_samples: int, crop: str, seed: int) -> np.ndarray:
    excess = wave.shape[0] - n_samples
    if crop == "start":
        start = 0
    elif crop == "center":
        start = excess // 2
    else:
        start = int(np.random.default_rng(seed).integers(0, excess + 1))
    return wave[start : start + n_samples]


def fit_length(
    wave: np.ndarray, n_samples: int, policy: str, crop: str, seed: int = 0, pad: str = "end"
) -> np.ndarray:
    """Apply a length policy so batches have a fixed shape.

    `pad_or_crop`: exactly `n_samples` (zero-pad or crop); `crop`: only crop clips that
    are longer; `none`: unchanged. `crop` picks the window: `start`, `center` (index time:
    deterministic), or `random` (training: a window drawn from `seed`). `pad` places the
    zeros: at the `end`, or on both sides with the clip `center`ed (the extra sample of an
    odd count at the end), as "Good, Fast, Cheap" pads its clips to 40 s.
    """
    if pad not in PAD_MODES:
        raise ValueError(f"unknown pad mode {pad!r}; expected one of {PAD_MODES}")
    if policy not in LENGTH_POLICIES:
        raise ValueError(f"unknown length policy {policy!r}; expected one of {LENGTH_POLICIES}")
    if crop not in CROP_MODES:
        raise ValueError(f"unknown crop mode {crop!r}; expected one of {CROP_MODES}")
    if n_samples <= 0:
        raise ValueError(f"n_samples must be positive, got {n_samples}")
    if policy == "none":
        return wave
    if wave.shape[0] > n_samples:
        return _crop(wave, n_samples, crop, seed)
    if policy == "pad_or_crop" and wave.shape[0] < n_samples:
        missing = n_samples - wave.shape[0]
        before = missing // 2 if pad == "center" else 0
        return np.pad(wave, (before, missing - before))
    return wave


def load_waveform(data: bytes, source: str, target_sr: int) -> np.ndarray:
    """Decode and resample to `target_sr` (model inputs are shaped by `AudioInputs`)."""
    wave, sr = decode_audio(data, source)
    return resample(wave, sr, target_sr)


def encode_flac(wave: np.ndarray, sr: int) -> bytes:
    """Mono FLAC (PCM_16) bytes: lossless at 16 bit and several times smaller than float mel.

    Samples are clipped to [-1, 1] first, the range PCM_16 represents.
    """
    wave = np.clip(np.asarray(wave, dtype=np.float32), -1.0, 1.0)
    if wave.ndim != 1 or wave.shape[0] == 0:
        raise ValueError(f"encode_flac expects a non-empty 1-D waveform, got shape {wave.shape}")
    buf = io.BytesIO()
    sf.write(buf, wave, int(sr), format="FLAC", subtype="PCM_16")
    return buf.getvalue()

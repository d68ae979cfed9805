"""Decoding real and broken audio, resampling, the length policy, FLAC round trip."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from gpa_ray.audio.io import (
    AudioDecodeError,
    decode_audio,
    encode_flac,
    fit_length,
    load_waveform,
    resample,
)


def _real_clips(shared_data: Path) -> dict[str, list[Path]]:
    return {
        "esc50": sorted((shared_data / "esc50" / "audio").glob("*.wav")),
        "audiocaps_demo": sorted((shared_data / "audiocaps_demo").glob("*.wav")),
        "clotho_demo": sorted((shared_data / "clotho_demo" / "audio").glob("*.wav")),
    }


def _wav_bytes(wave: np.ndarray, sr: int, subtype: str = "PCM_16", fmt: str = "WAV") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, wave, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def test_every_real_clip_decodes(shared_data: Path) -> None:
    clips = _real_clips(shared_data)
    # Counts from the shared data README: 414 ESC-50, 14 AudioCaps, 7 Clotho clips.
    assert {k: len(v) for k, v in clips.items()} == {
        "esc50": 414,
        "audiocaps_demo": 14,
        "clotho_demo": 7,
    }
    for corpus, paths in clips.items():
        for path in paths:
            wave, sr = decode_audio(path.read_bytes(), str(path))
            assert wave.dtype == np.float32 and wave.ndim == 1 and wave.size > 0, path
            assert np.isfinite(wave).all() and np.abs(wave).max() <= 1.0, path
            if corpus == "esc50":
                # ESC-50: 44.1 kHz, exactly 5.0 s.
                assert (sr, wave.shape[0]) == (44100, 220500), path
            elif corpus == "audiocaps_demo":
                assert sr == 22050 and 6.0 <= wave.shape[0] / sr <= 10.5, path
            else:
                assert sr == 44100 and 14.0 <= wave.shape[0] / sr <= 31.0, path


def test_stereo_is_averaged_to_mono() -> None:
    left = np.full(1000, 0.5, dtype=np.float32)
    right = np.full(1000, -0.25, dtype=np.float32)
    data = _wav_bytes(np.stack([left, right], axis=1), 16000, subtype="FLOAT")
    wave, sr = decode_audio(data, "stereo.wav")
    assert sr == 16000
    np.testing.assert_array_equal(wave, np.full(1000, 0.125, dtype=np.float32))


@pytest.mark.parametrize(("fmt", "subtype"), [("OGG", "VORBIS"), ("MP3", "MPEG_LAYER_III")])
def test_compressed_formats_decode(fmt: str, subtype: str) -> None:
    sr = 24000
    tone = (0.3 * np.sin(2 * np.pi * 440 * np.arange(sr) / sr)).astype(np.float32)
    wave, got_sr = decode_audio(_wav_bytes(tone, sr, subtype, fmt), f"tone.{fmt.lower()}")
    assert got_sr == sr and wave.shape[0] == sr
    spectrum = np.abs(np.fft.rfft(wave))
    assert np.argmax(spectrum) == 440  # 1 s at 24 kHz: rfft bin k is k Hz


def _raises_naming(data: bytes, path: Path, reason: str) -> AudioDecodeError:
    path.write_bytes(data)
    with pytest.raises(AudioDecodeError) as info:
        decode_audio(path.read_bytes(), str(path))
    err = info.value
    assert err.source == str(path) and str(path) in str(err)
    assert reason in err.reason, err.reason
    assert isinstance(err, ValueError)
    return err


def test_empty_file_raises(tmp_path: Path) -> None:
    _raises_naming(b"", tmp_path / "empty.wav", "empty")


def test_truncated_wav_raises(shared_data: Path, tmp_path: Path) -> None:
    real = sorted((shared_data / "esc50" / "audio").glob("*.wav"))[0].read_bytes()
    _raises_naming(real[: int(len(real) * 0.6)], tmp_path / "cut.wav", "truncated WAV")


def test_wav_cut_inside_header_raises(tmp_path: Path) -> None:
    data = _wav_bytes(np.zeros(100, dtype=np.float32), 8000)
    _raises_naming(data[:30], tmp_path / "header.wav", "truncated WAV")


def test_truncated_flac_raises(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = encode_flac((0.1 * rng.standard_normal(32000)).astype(np.float32), 32000)
    _raises_naming(data[: len(data) // 2], tmp_path / "cut.flac", "")


@pytest.mark.parametrize("name", ["notes.wav", "notes.mp3"])
def test_text_file_with_audio_name_raises(tmp_path: Path, name: str) -> None:
    text = b"<html><body>404 not found</body></html>\n" * 20
    _raises_naming(text, tmp_path / name, "Format not recognised")


def test_zero_length_audio_raises(tmp_path: Path) -> None:
    data = _wav_bytes(np.zeros(0, dtype=np.float32), 16000)
    _raises_naming(data, tmp_path / "zero.wav", "zero-length")


def test_non_finite_samples_raise(tmp_path: Path) -> None:
    wave = np.zeros(100, dtype=np.float32)
    wave[50] = np.nan
    _raises_naming(_wav_bytes(wave, 16000, subtype="FLOAT"), tmp_path / "nan.wav", "non-finite")


def test_resample_length_and_tone(shared_data: Path) -> None:
    path = sorted((shared_data / "esc50" / "audio").glob("*.wav"))[0]
    wave, sr = decode_audio(path.read_bytes(), str(path))
    out = resample(wave, sr, 24000)
    # 5.0 s at 44.1 kHz -> 5.0 s at 24 kHz = 120000 samples.
    assert out.dtype == np.float32 and out.shape == (120000,)
    assert resample(wave, sr, sr) is wave
    tone = np.sin(2 * np.pi * 1000 * np.arange(44100) / 44100).astype(np.float32)
    down = resample(tone, 44100, 32000)
    assert down.shape == (32000,)
    assert np.argmax(np.abs(np.fft.rfft(down))) == 1000  # 1 s at 32 kHz: bin k is k Hz


def test_fit_length_pad_or_crop() -> None:
    wave = np.arange(1, 11, dtype=np.float32)  # 1..10
    np.testing.assert_array_equal(
        fit_length(wave, 13, "pad_or_crop", "start"), [*range(1, 11), 0, 0, 0]
    )
    np.testing.assert_array_equal(fit_length(wave, 4, "pad_or_crop", "start"), [1, 2, 3, 4])
    # center: excess 6 -> start 3 -> samples 4..7.
    np.testing.assert_array_equal(fit_length(wave, 4, "pad_or_crop", "center"), [4, 5, 6, 7])
    np.testing.assert_array_equal(fit_length(wave, 10, "pad_or_crop", "center"), wave)


def test_fit_length_random_crop_is_seeded() -> None:
    wave = np.arange(1000, dtype=np.float32)
    a = fit_length(wave, 100, "pad_or_crop", "random", seed=7)
    b = fit_length(wave, 100, "pad_or_crop", "random", seed=7)
    np.testing.assert_array_equal(a, b)
    starts = {int(fit_length(wave, 100, "crop", "random", seed=s)[0]) for s in range(20)}
    assert len(starts) > 10 and min(starts) >= 0 and max(starts) <= 900
    for s in range(20):
        window = fit_length(wave, 100, "crop", "random", seed=s)
        np.testing.assert_array_equal(window, np.arange(window[0], window[0] + 100))


def test_fit_length_crop_only_and_none() -> None:
    wave = np.ones(10, dtype=np.float32)
    assert fit_length(wave, 20, "crop", "start").shape == (10,)
    assert fit_length(wave, 5, "crop", "start").shape == (5,)
    assert fit_length(wave, 5, "none", "start") is wave
    with pytest.raises(ValueError, match="length policy"):
        fit_length(wave, 5, "trim", "start")
    with pytest.raises(ValueError, match="crop mode"):
        fit_length(wave, 5, "crop", "middle")


def test_load_waveform_decodes_and_resamples(shared_data: Path) -> None:
    path = sorted((shared_data / "esc50" / "audio").glob("*.wav"))[1]
    data = path.read_bytes()
    wave, sr = decode_audio(data, str(path))
    assert sr == 44100 and wave.shape == (220500,)
    resampled = load_waveform(data, str(path), 32000)
    assert resampled.shape == (160000,)
    np.testing.assert_array_equal(resampled, resample(wave, 44100, 32000))


def test_flac_round_trip(shared_data: Path) -> None:
    path = sorted((shared_data / "esc50" / "audio").glob("*.wav"))[2]
    wave = load_waveform(path.read_bytes(), str(path), 32000)
    data = encode_flac(wave, 32000)
    back, sr = decode_audio(data, "roundtrip.flac")
    assert sr == 32000 and back.shape == wave.shape
    # This clip overshoots 1.0 after resampling; PCM_16 holds [-1, 32767/32768], so the
    # reference is the clipped wave, and the error is at most half a step of 1/32768.
    assert np.abs(wave).max() > 1.0
    reference = np.clip(wave, -1.0, 32767 / 32768)
    assert np.abs(back - reference).max() <= 0.5 / 32768 + 1e-7
    assert len(data) < wave.nbytes / 2  # far smaller than the float32 samples
    clipped, _ = decode_audio(encode_flac(np.array([2.0, -2.0, 0.5], np.float32), 8000), "c")
    np.testing.assert_allclose(clipped, [32767 / 32768, -1.0, 0.5], atol=1e-6)

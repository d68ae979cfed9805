"""aiSFX CNN: Essentia front end rebuilt in torch, and parity with the package's pipeline."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from gpa_ray.models.aisfx_cnn import (
    BLOCK_FRAMES,
    NORM_MAX,
    AisfxCNN,
    AisfxFrontEnd,
    block_starts,
    build_aisfx_encoder,
    checkpoint_path,
    checkpoint_safe_globals,
    essentia_mel_filterbank,
    load_aisfx_state_dict,
    n_frames,
)

pytest.importorskip("aisfx")


# ---- plain-Python references that follow Essentia's C++ step by step -------------------


def _hz2mel(f: float) -> float:
    return 2595.0 * math.log10(1.0 + f / 700.0)


def _mel2hz(m: float) -> float:
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)


def reference_filterbank(n_mels: int = 96, n_bins: int = 1025, sr: float = 44100.0) -> list:
    """MelBands(htkMel, warping weights, unit_sum) in float64 with explicit loops."""
    low, high = _hz2mel(0.0), _hz2mel(sr / 2)
    edges = [_mel2hz(low + i * (high - low) / (n_mels + 1)) for i in range(n_mels + 2)]
    scale = (sr / 2) / (n_bins - 1)
    bands = []
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        weights = {}
        for j in range(math.ceil(lo / scale), math.floor(hi / scale) + 1):
            f = j * scale
            if f < mid:
                weights[j] = (_hz2mel(f) - _hz2mel(lo)) / (_hz2mel(mid) - _hz2mel(lo))
            else:
                weights[j] = (_hz2mel(hi) - _hz2mel(f)) / (_hz2mel(hi) - _hz2mel(mid))
        total = sum(weights.values())
        bands.append({j: w / total for j, w in weights.items()})
    return bands


def essentia_frame_count(n: int, frame: int = 2048, hop: int = 1024) -> int:
    """The streaming FrameCutter's process() loop (startFromZero=False), counting frames."""
    start, stream, count = -((frame + 1) // 2), 0, 0
    while True:
        available = n - stream
        if available == 0:
            return count
        acquire, release, last = frame, min(hop, frame), False
        if start < 0:
            acquire, release = frame + start, 0
        if acquire >= available:
            release = min(available, hop) if start >= 0 else 0
            last = start + frame // 2 >= stream + available
        count += 1
        start += hop
        stream += release
        if last:
            return count


def reference_spectrogram(y: np.ndarray) -> np.ndarray:
    """FrameCutter -> Hann (symmetric, unnormalised) -> |FFT| -> MelBands(power) -> log."""
    frame, hop = 2048, 1024
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(frame) / (frame - 1))
    bands = reference_filterbank()
    rows = []
    for k in range(essentia_frame_count(len(y))):
        start = -frame // 2 + k * hop
        cut = np.zeros(frame)
        lo, hi = max(start, 0), min(start + frame, len(y))
        cut[lo - start : hi - start] = y[lo:hi]
        power = np.abs(np.fft.rfft(cut * window)) ** 2
        energies = [sum(power[j] * w for j, w in band.items()) for band in bands]
        rows.append(np.log10(10000.0 * np.asarray(energies) + 1.0))
    return np.stack(rows)


# ---- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def esc50_clip(shared_data: Path) -> tuple[Path, np.ndarray]:
    path = sorted((shared_data / "esc50" / "audio").glob("*.wav"))[0]
    y, sr = sf.read(path, dtype="float32")
    assert sr == 44100 and y.ndim == 1
    return path, y


@pytest.fixture(scope="module")
def encoder() -> AisfxCNN:
    torch.set_num_threads(1)
    return build_aisfx_encoder().eval()


@pytest.fixture(scope="module")
def package_model() -> torch.nn.Module:
    """The package's own CrossNet, loaded by its own functions."""
    from aisfx import inference

    with checkpoint_safe_globals():  # torch >= 2.6 loads with weights_only=True
        weights, datasets = inference.load_weights("cpu")
    return inference.load_bestModel(weights, datasets, "cpu")


# ---- front end --------------------------------------------------------------------------


def test_frame_count_matches_framecutter_loop() -> None:
    for n in [1, 1023, 1024, 1025, 2047, 2048, 2049, 5000, 220500]:
        assert n_frames(n) == essentia_frame_count(n), n
    # ceil(220500 / 1024) + 1 = 216 + 1 (a 5 s ESC-50 clip).
    assert n_frames(220500) == 217
    assert torch.equal(n_frames(torch.tensor([1024, 1025])), torch.tensor([2, 3]))


def test_filterbank_matches_plain_loop() -> None:
    ours = essentia_mel_filterbank()
    assert ours.shape == (96, 1025) and ours.dtype == np.float32
    dense = np.zeros((96, 1025))
    for i, band in enumerate(reference_filterbank()):
        for j, w in band.items():
            dense[i, j] = w
    np.testing.assert_allclose(ours, dense, atol=2e-6)
    np.testing.assert_allclose(ours.sum(axis=1), 1.0, rtol=1e-5)


def test_front_end_matches_reference_on_esc50(esc50_clip) -> None:
    _, y = esc50_clip
    spec, _ = AisfxFrontEnd(normalize=False)(torch.from_numpy(y)[None])
    expected = reference_spectrogram(y.astype(np.float64))
    assert spec.shape == (1, 217, 96)
    np.testing.assert_allclose(spec[0].numpy(), expected, atol=1e-4)
    normalised, _ = AisfxFrontEnd()(torch.from_numpy(y)[None])
    torch.testing.assert_close(normalised, spec / NORM_MAX)


def test_batched_front_end_equals_single_clips(esc50_clip) -> None:
    _, y = esc50_clip
    a, b = torch.from_numpy(y[:100_000]), torch.from_numpy(y[50_000:150_500])
    batch = torch.zeros(2, 100_500)
    batch[0, :100_000], batch[1] = a, b
    front = AisfxFrontEnd()
    spec, lengths = front(batch, torch.tensor([100_000, 100_500]))
    assert lengths.tolist() == [n_frames(100_000), n_frames(100_500)] == [99, 100]
    torch.testing.assert_close(spec[0, :99], front(a[None])[0][0])
    torch.testing.assert_close(spec[1], front(b[None])[0][0])


@pytest.mark.skipif(
    importlib.util.find_spec("essentia") is None,
    reason="essentia is not installed (the package's own front end needs it)",
)
def test_front_end_matches_package_essentia(esc50_clip) -> None:
    from aisfx.spectrogram import spectrogram_essentia

    path, y = esc50_clip
    expected = spectrogram_essentia.compute_spectrogram(
        str(path), sr=44100.0, block_size=2048, hop_size=1024, n_mels=96, f_min=0.0, f_max=22050.0
    )
    spec, _ = AisfxFrontEnd(normalize=False)(torch.from_numpy(y)[None])
    assert spec.shape[1:] == expected.shape
    # Essentia adds -100 dB noise to silent frames: ~1e-4 after log10(1e4 x + 1).
    np.testing.assert_allclose(spec[0].numpy(), expected, atol=1e-3)


# ---- network ----------------------------------------------------------------------------


def test_state_dict_comes_from_installed_package() -> None:
    path = checkpoint_path()
    assert path.is_file() and path.parent.parent.name == "aisfx"
    state = load_aisfx_state_dict()
    assert len(state) == 4 * 12 and not any(k.startswith(("fc.", "embedding_net.")) for k in state)
    model = AisfxCNN()
    assert sorted(model.state_dict()) == sorted(state)
    # Conv weights 9 * c_in * c_out twice plus 4 * c_out BN affine per block, by hand:
    # 37,696 + 221,696 + 885,760 + 3,540,992.
    assert sum(p.numel() for p in model.parameters()) == 4_686_144


def test_blocks_follow_package_blocking() -> None:
    from aisfx.preprocessing import blocking

    for n in [60, 100, 149, 150, 217, 400]:
        data = np.arange(n * 2, dtype=float).reshape(n, 2)
        blocks = blocking(data, block_size=BLOCK_FRAMES, hop_size=50, drop_partial_block=True)
        starts = block_starts(n)
        assert len(starts) == len(blocks), n
        for s, block in zip(starts, blocks, strict=True):
            padded = np.vstack([data, np.zeros((BLOCK_FRAMES, 2))])
            np.testing.assert_array_equal(block, padded[s : s + BLOCK_FRAMES])


def test_clip_embeddings_match_package_pipeline(esc50_clip, encoder, package_model) -> None:
    from aisfx import inference, preprocessing

    _, y = esc50_clip
    raw, _ = AisfxFrontEnd(normalize=False)(torch.from_numpy(y)[None])
    expected = inference.model_get_embedding(
        preprocessing.spectrogram_normalize(raw[0].numpy(), spec_norm="original"),
        0.5,
        True,
        package_model,
        "cpu",
    )
    spec, _ = AisfxFrontEnd()(torch.from_numpy(y)[None])
    with torch.no_grad():
        ours = encoder.block_embeddings(spec[0])
    assert ours.shape == expected.shape == (3, 512)
    torch.testing.assert_close(ours, expected, atol=1e-4, rtol=1e-4)


def test_tower_output_on_one_block_is_package_embedding(esc50_clip, encoder, package_model):
    _, y = esc50_clip
    spec, _ = AisfxFrontEnd()(torch.from_numpy(y)[None])
    block = spec[:, :BLOCK_FRAMES]
    with torch.no_grad():
        out = encoder(block)
        expected = package_model.get_embedding(block)
    assert out.frames.shape == (1, 12, 512) and out.mask.all()
    torch.testing.assert_close(out.global_, expected, atol=1e-5, rtol=1e-5)


def test_frame_mask_and_masked_max(encoder) -> None:
    spec = torch.rand(2, 64, 96)
    with torch.no_grad():
        out = encoder(spec, torch.tensor([64, 20]))
    # 64 -> 8 frames; 20 -> 10, 5, 3 valid frames (three ceil-halvings).
    assert out.mask.tolist() == [[True] * 8, [True] * 3 + [False] * 5]
    torch.testing.assert_close(out.global_[1], out.frames[1, :3].max(dim=0).values)
    torch.testing.assert_close(out.global_[0], out.frames[0].max(dim=0).values)

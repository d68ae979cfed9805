"""PANNs CNN14 / ResNet38 encoders: shapes, frame masks, pooling, checkpoint loading."""

from __future__ import annotations

import io

import pytest
import torch

from gpa_ray import storage
from gpa_ray.models.audio_cnn import (
    Cnn14,
    ResNet38,
    build_audio_cnn,
    frame_mask,
    load_panns_weights,
)
from gpa_ray.testing.models import tiny_audio_cnn

KINDS = ["cnn14", "resnet38"]


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_with_tiny_width(kind: str) -> None:
    model = tiny_audio_cnn(kind, n_mels=64).eval()
    out = model(torch.randn(2, 100, 64))
    # width 8 -> 32 * 8 = 256 channels; 100 frames // 32 = 3 output frames.
    assert model.out_dim == 256
    assert out.frames.shape == (2, 3, 256)
    assert out.mask.shape == (2, 3) and out.mask.dtype == torch.bool and out.mask.all()
    assert out.global_.shape == (2, 256)


@pytest.mark.parametrize("kind", KINDS)
def test_backward_in_train_mode(kind: str) -> None:
    model = tiny_audio_cnn(kind).train()
    out = model(torch.randn(3, 64, 32))
    (out.frames.sum() + out.global_.sum()).backward()
    assert model.bn0.weight.grad is not None
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_frame_mask_from_lengths_hand_values() -> None:
    # Five ceil-halvings, clipped to T' = 100 // 32 = 3 (worked by hand):
    # 100 -> 50, 25, 13, 7, 4 -> 3 ; 40 -> 20, 10, 5, 3, 2 ; 1 -> 1, 1, 1, 1, 1.
    mask = frame_mask(torch.tensor([100, 40, 1]), n_in=100, n_out=3, batch=3)
    expected = torch.tensor([[True, True, True], [True, True, False], [True, False, False]])
    assert torch.equal(mask, expected)
    assert frame_mask(None, 100, 3, 2).all()


@pytest.mark.parametrize("kind", KINDS)
def test_model_mask_and_masked_pooling(kind: str) -> None:
    model = tiny_audio_cnn(kind, n_mels=64).eval()
    lengths = torch.tensor([128, 70])
    out = model(torch.randn(2, 128, 64), lengths)
    # 128 -> T' = 4; 70 -> 35, 18, 9, 5, 3 valid frames.
    assert out.mask.tolist() == [[True] * 4, [True, True, True, False]]
    # global = mean_t + max_t over the valid frames only, computed with a plain loop.
    for b, n in enumerate([4, 3]):
        rows = [out.frames[b, t] for t in range(n)]
        mean = sum(rows) / n
        maxed = torch.stack(rows).max(dim=0).values
        torch.testing.assert_close(out.global_[b], mean + maxed)


def test_global_without_lengths_is_panns_pooling() -> None:
    """PANNs Cnn14.forward, transcribed: conv blocks, freq mean, max_t + mean_t."""
    torch.manual_seed(0)
    model = Cnn14(n_mels=64, width=8).eval()
    logmel = torch.randn(2, 96, 64)
    x = logmel.unsqueeze(1).transpose(1, 3)
    x = model.bn0(x).transpose(1, 3)
    for i in range(1, 7):
        x = getattr(model, f"conv_block{i}")(x, pool_size=(2, 2) if i < 6 else (1, 1))
    x = torch.mean(x, dim=3)
    (x1, _) = torch.max(x, dim=2)
    x2 = torch.mean(x, dim=2)
    out = model(logmel)
    torch.testing.assert_close(out.global_, x1 + x2)
    torch.testing.assert_close(out.frames, x.transpose(1, 2))


def test_paper_scale_parameter_counts_and_names() -> None:
    with torch.device("meta"):
        cnn14, resnet38 = Cnn14(), ResNet38()
    # PANNs reports 80,753,615 parameters for Cnn14 (527 classes) and 73,783,247 for ResNet38;
    # minus fc1 (2048*2048 + 2048) and fc_audioset (2048*527 + 527) = 5,276,175 here.
    assert sum(p.numel() for p in cnn14.parameters()) == 80_753_615 - 5_276_175
    assert sum(p.numel() for p in resnet38.parameters()) == 73_783_247 - 5_276_175
    assert {"bn0.running_mean", "conv_block1.conv1.weight", "conv_block6.bn2.bias"} <= set(
        cnn14.state_dict()
    )
    assert {
        "resnet.layer1.0.conv1.weight",
        "resnet.layer2.0.downsample.1.weight",
        "resnet.layer2.0.downsample.2.running_var",
        "resnet.layer4.2.bn2.weight",
        "conv_block_after1.conv2.weight",
    } <= set(resnet38.state_dict())


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_strict(kind: str, tmp_path) -> None:
    source = tiny_audio_cnn(kind, seed=1).eval()
    path = tmp_path / "weights.pt"
    torch.save(source.state_dict(), path)
    target = tiny_audio_cnn(kind, seed=2).eval()
    missing, unexpected = load_panns_weights(target, str(path), strict=True)
    assert missing == [] and unexpected == []
    logmel = torch.randn(2, 64, 32)
    torch.testing.assert_close(target(logmel).global_, source(logmel).global_)


def test_official_checkpoint_layout_reports_unused_keys(tmp_path) -> None:
    source = tiny_audio_cnn("cnn14", n_mels=64, seed=3)
    state = dict(source.state_dict())
    extra = {
        "spectrogram_extractor.stft.conv_real.weight": torch.zeros(513, 1, 1024),
        "logmel_extractor.melW": torch.zeros(513, 64),
        "fc1.weight": torch.zeros(256, 256),
        "fc1.bias": torch.zeros(256),
        "fc_audioset.weight": torch.zeros(527, 256),
        "fc_audioset.bias": torch.zeros(527),
    }
    path = tmp_path / "Cnn14_mAP=0.431.pth"
    torch.save({"model": {**state, **extra}, "iteration": 1000}, path)
    model = build_audio_cnn("cnn14", n_mels=64, width=8)
    missing, unexpected = load_panns_weights(model, str(path))
    assert missing == []
    assert sorted(unexpected) == sorted(extra)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, state[name])


def test_width_mismatch_fails_loudly(tmp_path) -> None:
    path = tmp_path / "w8.pt"
    torch.save(tiny_audio_cnn("cnn14").state_dict(), path)
    with pytest.raises(RuntimeError, match="size mismatch"):
        build_audio_cnn("cnn14", n_mels=32, width=16, weights=str(path))


@pytest.mark.s3
def test_weights_from_s3_uri(s3_server) -> None:
    source = tiny_audio_cnn("resnet38", seed=4).eval()
    uri = s3_server.uri("weights", "resnet38.pt")
    storage.write_bytes(uri, _state_bytes(source.state_dict()), storage_cfg=s3_server.storage)
    model = build_audio_cnn(
        "resnet38", n_mels=32, width=8, weights=uri, storage_cfg=s3_server.storage
    ).eval()
    logmel = torch.randn(1, 64, 32)
    torch.testing.assert_close(model(logmel).frames, source(logmel).frames)


def test_rejects_bad_inputs() -> None:
    model = tiny_audio_cnn("cnn14")
    with pytest.raises(ValueError, match="at least 32 frames"):
        model(torch.randn(1, 20, 32))
    with pytest.raises(ValueError, match="log-mel"):
        model(torch.randn(1, 64, 40))
    with pytest.raises(ValueError, match="unknown audio CNN"):
        build_audio_cnn("cnn10")


def _state_bytes(state: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()

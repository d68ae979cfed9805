"""ResNet / ViT on spectrograms: channel stacking, frames, masks, weights by reference."""

from __future__ import annotations

import pytest
import torch
from transformers import ResNetConfig, ResNetForImageClassification, ResNetModel

from gpa_ray.models.spectrogram_vision import (
    SpectrogramImage,
    SpectrogramResNet,
    SpectrogramViT,
    build_spectrogram_vision,
    resnet50_config,
    vit_b16_config,
)
from gpa_ray.testing.models import tiny_spectrogram_resnet, tiny_spectrogram_vit

EPS_SCALE = 1.0 / (1.0 + 1e-5) ** 0.5
"""A fresh BatchNorm in eval mode maps x to x / sqrt(1 + eps)."""


def test_repeat_channels_are_identical_normalised_logmel() -> None:
    image = SpectrogramImage(n_mels=4, channels="repeat").eval()
    logmel = torch.randn(2, 10, 4)
    out = image(logmel)
    assert out.shape == (2, 3, 4, 10)  # [B, 3, mel (height), time (width)]
    for c in range(3):
        torch.testing.assert_close(out[:, c], logmel.transpose(1, 2) * EPS_SCALE)


def test_delta_channels_on_a_ramp() -> None:
    # Log-mel rising by 1 per frame: delta = sum_n n (c[t+n] - c[t-n]) / (2 sum n^2) = 1
    # away from the edges (window 5), and the delta of a constant is 0.
    image = SpectrogramImage(n_mels=3, channels="deltas").eval()
    ramp = torch.arange(12, dtype=torch.float32)[None, :, None].expand(1, 12, 3)
    out = image(ramp)
    torch.testing.assert_close(out[0, 0], ramp[0].T * EPS_SCALE)
    torch.testing.assert_close(out[0, 1, :, 4:-4], torch.full((3, 4), EPS_SCALE))
    torch.testing.assert_close(out[0, 2, :, 4:-4], torch.zeros(3, 4))


def test_resnet_shapes_and_pooled_global() -> None:
    model = tiny_spectrogram_resnet(n_mels=64).eval()
    logmel = torch.randn(2, 100, 64)
    out = model(logmel)
    # Five stride-2 stages with padding: ceil(100 / 32) = 4 frames, 32 channels.
    assert out.frames.shape == (2, 4, 32) and out.global_.shape == (2, 32)
    assert out.mask.all()
    pooled = model.backbone(model.image(logmel)).pooler_output.flatten(1)
    torch.testing.assert_close(out.global_, pooled)


def test_resnet_frame_mask_and_masked_mean() -> None:
    model = tiny_spectrogram_resnet().eval()
    out = model(torch.randn(2, 100, 32), torch.tensor([100, 33]))
    # 33 -> 17, 9, 5, 3, 2 valid of 4 frames.
    assert out.mask.tolist() == [[True] * 4, [True, True, False, False]]
    torch.testing.assert_close(out.global_[1], (out.frames[1, 0] + out.frames[1, 1]) / 2)


def test_vit_frames_are_time_columns() -> None:
    model = tiny_spectrogram_vit(n_mels=32).eval()
    logmel = torch.randn(2, 70, 32)
    out = model(logmel)
    # 8x8 patches: 32 mel bins -> 4 rows, 70 frames -> 8 columns (the conv floors).
    assert out.frames.shape == (2, 8, 32) and out.global_.shape == (2, 32)
    tokens = model.backbone(model.image(logmel), interpolate_pos_encoding=True).last_hidden_state
    torch.testing.assert_close(out.global_, tokens[:, 0])
    for col in range(8):
        column = [tokens[:, 1 + row * 8 + col] for row in range(4)]
        torch.testing.assert_close(out.frames[:, col], sum(column) / 4)


def test_vit_padding_does_not_leak() -> None:
    model = tiny_spectrogram_vit().eval()
    logmel = torch.randn(2, 64, 32)
    lengths = torch.tensor([64, 30])
    out = model(logmel, lengths)
    # ceil(30 / 8) = 4 valid time columns of 8.
    assert out.mask.tolist() == [[True] * 8, [True] * 4 + [False] * 4]
    changed = logmel.clone()
    changed[1, 32:] = 100.0
    again = model(changed, lengths)
    torch.testing.assert_close(again.global_, out.global_)
    torch.testing.assert_close(again.frames[1, :4], out.frames[1, :4])


@pytest.mark.parametrize("kind", ["resnet50", "vit_b16"])
def test_weights_by_reference_round_trip(kind: str, tmp_path) -> None:
    source = tiny_spectrogram_resnet() if kind == "resnet50" else tiny_spectrogram_vit()
    source.eval()
    source.backbone.save_pretrained(tmp_path)
    loaded = build_spectrogram_vision(kind, n_mels=32, weights=str(tmp_path)).eval()
    logmel = torch.randn(1, 64, 32)
    torch.testing.assert_close(loaded(logmel).global_, source(logmel).global_)


def test_classifier_checkpoint_loads_its_backbone(tmp_path) -> None:
    config = ResNetConfig(embedding_size=8, hidden_sizes=[8, 16, 16, 32], depths=[1, 1, 1, 1])
    torch.manual_seed(0)
    classifier = ResNetForImageClassification(config)
    classifier.save_pretrained(tmp_path)
    model = build_spectrogram_vision("resnet50", n_mels=32, weights=str(tmp_path))
    assert isinstance(model, SpectrogramResNet) and isinstance(model.backbone, ResNetModel)
    for name, value in classifier.resnet.state_dict().items():
        torch.testing.assert_close(model.backbone.state_dict()[name], value)


def test_paper_scale_configs() -> None:
    with torch.device("meta"):
        resnet = build_spectrogram_vision("resnet50")
        vit = build_spectrogram_vision("vit_b16")
    assert isinstance(resnet, SpectrogramResNet) and resnet.out_dim == 2048
    assert isinstance(vit, SpectrogramViT) and vit.out_dim == 768
    # torchvision's ResNet-50 has 25,557,032 parameters, 2,049,000 of them in its fc layer.
    backbone = sum(p.numel() for p in resnet.backbone.parameters())
    assert backbone == 25_557_032 - 2_049_000
    assert resnet50_config().depths == [3, 4, 6, 3]
    assert (vit_b16_config().patch_size, vit_b16_config().num_hidden_layers) == (16, 12)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown spectrogram backbone"):
        build_spectrogram_vision("resnet18")
    with pytest.raises(ValueError, match="channels"):
        SpectrogramImage(64, channels="rgb")
    with pytest.raises(ValueError, match="log-mel"):
        tiny_spectrogram_resnet()(torch.randn(1, 64, 40))

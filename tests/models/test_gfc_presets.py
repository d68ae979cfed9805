"""The "Good, Fast, Cheap" presets: their settings, and their towers at full size with
random weights (the published ImageNet / AudioSet weights cannot be downloaded here)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.config_loading import load_config, preset_names
from gpa_ray.models.audio_tower import audio_blocks
from gpa_ray.models.factory import build_audio_encoder
from gpa_ray.models.gpa import GPAModel
from gpa_ray.models.text import TextEncoder
from gpa_ray.testing.models import save_tiny_text_model

TOWERS = {"resnet50": (32, 1e-4), "vit_b16": (16, 1e-3), "cnn14": (8, 1e-4)}


@pytest.mark.parametrize("tower", sorted(TOWERS))
def test_settings_the_paper_gives(tower: str) -> None:
    cfg = load_config(f"clotho_gfc_{tower}")
    assert f"clotho_gfc_{tower}" in preset_names()
    batch, lr = TOWERS[tower]  # Table 4: the lowest validation loss of each model
    assert (cfg.train.batch_size, cfg.train.lr, cfg.train.num_workers) == (batch, lr, 1)
    assert cfg.corpus.kind == "clotho" and cfg.audio_encoder.kind == tower
    assert (cfg.audio.max_seconds, cfg.audio.length_policy, cfg.audio.pad) == (
        40.0,
        "pad_or_crop",
        "center",
    )
    assert cfg.text.model == "roberta-base" and cfg.text.max_length == 30
    assert cfg.text.trainable_layers == 0
    assert (cfg.gpa.loss, cfg.gpa.scorer, cfg.gpa.projection) == ("info_nce", "none", "linear")
    assert (cfg.gpa.caption_aug, cfg.gpa.caption_aug_share) == ("lexical", 0.2)
    assert cfg.train.lr_schedule == "plateau" and cfg.audio_encoder.spec_augment
    # GFC s3 asks for time stretching with the masks (the GPA presets have none), and s5 /
    # T3 count one training item per caption: every (clip, caption) pair once per epoch.
    assert cfg.features.time_stretch_min < 1.0 < cfg.features.time_stretch_max
    assert cfg.train.pairs_per_epoch == "caption"
    if tower == "cnn14":
        assert cfg.audio_encoder.trainable_layers == -1
        assert cfg.audio_encoder.early_lr_scale < 1.0 and cfg.features.scale == "mel"
    else:
        assert cfg.audio_encoder.trainable_layers == 2 and cfg.features.scale == "linear"
        assert cfg.audio_encoder.channels == "repeat"


@pytest.mark.parametrize("tower", ["resnet50", "vit_b16"])
def test_image_towers_at_full_size_train_their_last_two_groups(tower: str) -> None:
    cfg = load_config(f"clotho_gfc_{tower}")
    encoder = build_audio_encoder(cfg)
    blocks = audio_blocks(encoder.encoder)
    for block in blocks[:-2]:
        assert not any(p.requires_grad for p in block.parameters())
    for block in blocks[-2:]:
        assert all(p.requires_grad for p in block.parameters())
    frozen = build_audio_encoder(
        load_config(f"clotho_gfc_{tower}", ["audio_encoder.trainable_layers=0"])
    )
    assert frozen.frozen
    # A 40 s clip (centred in silence) becomes the full linear spectrogram image, and
    # the tower runs on a shorter one (the full one is the slow paper-scale run's job).
    inputs = AudioInputs(cfg)
    wave = np.random.default_rng(0).standard_normal(32000 * 20).astype(np.float32) * 0.1
    full = inputs.from_waveform(wave, 32000)["logmel"]
    assert full.shape == (1 + 40 * 32000 // 1024, 513)
    short = AudioInputs(
        dataclasses.replace(cfg, audio=dataclasses.replace(cfg.audio, max_seconds=2.0))
    )
    batch = short.collate([short.from_waveform(wave, 32000, train=True, seed=1)])
    out = encoder.eval()(**batch)
    width = 2048 if tower == "resnet50" else 768
    assert out.global_.shape == (1, width) and torch.isfinite(out.global_).all()


def test_cnn14_preset_builds_the_paper_tower_with_layerwise_lr(tmp_path) -> None:
    from gpa_ray.train.param_groups import gpa_param_groups

    cfg = load_config("clotho_gfc_cnn14")
    encoder = build_audio_encoder(cfg)
    assert encoder.out_dim == 2048 and not encoder.frozen
    text_cfg = dataclasses.replace(
        cfg.text, model=save_tiny_text_model(tmp_path / "text"), allow_download=False
    )
    text = TextEncoder.from_config(text_cfg)
    model = GPAModel(cfg.gpa, encoder, text)
    assert isinstance(model.audio_global_proj, torch.nn.Linear)
    late, early = gpa_param_groups(model, cfg)
    assert early["lr"] == pytest.approx(cfg.train.lr * cfg.audio_encoder.early_lr_scale)
    cnn = encoder.encoder
    assert {id(p) for p in cnn.conv_block6.parameters()} <= {id(p) for p in late["params"]}
    assert {id(p) for p in cnn.conv_block1.parameters()} <= {id(p) for p in early["params"]}


def test_projection_kinds() -> None:
    from gpa_ray.models.gpa import ProjectionMLP, build_projection

    assert isinstance(build_projection("mlp", 4, 3), ProjectionMLP)
    linear = build_projection("linear", 4, 3)
    assert isinstance(linear, torch.nn.Linear) and linear.weight.shape == (3, 4)
    with pytest.raises(ValueError, match="gpa.projection 'conv'"):
        build_projection("conv", 4, 3)

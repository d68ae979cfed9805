"""build_gpa / build_audio_encoder / build_text_encoder: every tower kind from a config,
weights by reference, freezing policy, and `load_weights=False` giving the same layout."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from gpa_ray import checkpoints
from gpa_ray.audio.inputs import KINDS as AUDIO_KINDS
from gpa_ray.audio.inputs import AudioInputs
from gpa_ray.config import AudioEncoderConfig, Config, TextConfig
from gpa_ray.config_loading import load_config
from gpa_ray.models.aisfx_cnn import AisfxCNN, load_aisfx_state_dict
from gpa_ray.models.audio_cnn import Cnn14, ResNet38
from gpa_ray.models.audio_tower import AudioTower
from gpa_ray.models.audioformer import AudioFormerClassifier, AudioFormerEncoder
from gpa_ray.models.factory import build_audio_encoder, build_gpa, build_text_encoder
from gpa_ray.models.gpa import GPAModel
from gpa_ray.models.spectrogram_vision import SpectrogramResNet, SpectrogramViT
from gpa_ray.testing.models import (
    save_tiny_text_model,
    tiny_audioformer_config,
    tiny_code_ids,
    tiny_gpa_run_config,
    tiny_spectrogram_resnet,
    tiny_spectrogram_vit,
)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    return save_tiny_text_model(tmp_path_factory.mktemp("tiny_bert"))


def _cfg(text_dir: str, **audio: object) -> Config:
    cfg = tiny_gpa_run_config(text_dir)
    return dataclasses.replace(cfg, audio_encoder=dataclasses.replace(cfg.audio_encoder, **audio))


def _embed_clips(model: GPAModel, cfg: Config) -> torch.Tensor:
    inputs = AudioInputs.from_config(cfg)
    rng = np.random.default_rng(0)
    waves = [rng.normal(0, 0.1, n).astype(np.float32) for n in (32000, 20000)]
    batch = inputs.collate([inputs.from_waveform(w, 32000) for w in waves])
    with torch.no_grad():
        return model.eval().embed_audio(batch).global_


def test_build_gpa_from_config(text_dir: str) -> None:
    cfg = _cfg(text_dir)
    model = build_gpa(cfg)
    assert isinstance(model, GPAModel) and isinstance(model.audio_encoder, AudioTower)
    assert isinstance(model.audio_encoder.encoder, Cnn14)
    assert model.audio_encoder.out_dim == 64  # CNN14 at width 2: 32 * 2
    assert model.text_encoder.dim == 32 and model.text_encoder.pooling == "cls"
    emb = _embed_clips(model, cfg)
    assert emb.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


@pytest.mark.parametrize(("layers", "trainable"), [(-1, 7), (0, 0), (2, 2)])
def test_audio_freezing_policy(text_dir: str, layers: int, trainable: int) -> None:
    tower = build_audio_encoder(_cfg(text_dir, trainable_layers=layers))
    cnn = tower.encoder
    blocks = [cnn.bn0, *(getattr(cnn, f"conv_block{i}") for i in range(1, 7))]
    trains = [any(p.requires_grad for p in b.parameters()) for b in blocks]
    assert sum(trains) == trainable and trains == sorted(trains)  # only the last blocks
    tower.train()
    # Frozen blocks stay in eval mode (BatchNorm statistics do not move), trained ones train.
    assert [b.training for b in blocks] == trains
    assert tower.frozen == (trainable == 0)


def test_frozen_tower_keeps_batchnorm_statistics(text_dir: str) -> None:
    cfg = _cfg(text_dir, trainable_layers=0)
    model = build_gpa(cfg).train()
    before = model.audio_encoder.encoder.bn0.running_mean.clone()
    inputs = AudioInputs.from_config(cfg)
    wave = np.random.default_rng(0).normal(0, 0.1, 32000).astype(np.float32)
    audio_emb, _ = model(inputs.collate([inputs.from_waveform(wave, 32000)]), ["a dog barks"])
    assert torch.equal(model.audio_encoder.encoder.bn0.running_mean, before)
    assert audio_emb.global_.requires_grad  # the projection still trains


def test_aisfx_package_weights_by_reference(text_dir: str) -> None:
    cfg = dataclasses.replace(
        _cfg(text_dir, kind="aisfx", weights="pkg:aisfx", width=64),
        features=dataclasses.replace(Config().features),
    )
    tower = build_audio_encoder(cfg)
    assert isinstance(tower.encoder, AisfxCNN) and tower.out_dim == 512
    for name, value in load_aisfx_state_dict().items():
        assert torch.equal(tower.encoder.state_dict()[name], value)
    skeleton = build_audio_encoder(cfg, load_weights=False)
    weights = skeleton.encoder.conv_block1.conv1.weight
    assert not torch.equal(weights, tower.encoder.conv_block1.conv1.weight)


def test_resnet38_and_panns_weights_by_path(text_dir: str, tmp_path: Path) -> None:
    cfg = _cfg(text_dir, kind="resnet38", width=2)
    source = build_audio_encoder(cfg)
    assert isinstance(source.encoder, ResNet38)
    path = tmp_path / "panns.pth"
    torch.save({"model": source.encoder.state_dict()}, path)  # the official files' layout
    loaded = build_audio_encoder(
        dataclasses.replace(
            cfg, audio_encoder=dataclasses.replace(cfg.audio_encoder, weights=str(path))
        )
    )
    for name, value in source.encoder.state_dict().items():
        assert torch.equal(loaded.encoder.state_dict()[name], value)


@pytest.mark.parametrize("kind", ["resnet50", "vit"])
def test_spectrogram_vision_weights_by_reference(text_dir: str, tmp_path: Path, kind: str) -> None:
    builder = tiny_spectrogram_resnet if kind == "resnet50" else tiny_spectrogram_vit
    reference = builder()
    reference.backbone.save_pretrained(str(tmp_path))
    cfg = _cfg(text_dir, kind=kind, weights=str(tmp_path))
    model = build_gpa(cfg)
    expected = SpectrogramResNet if kind == "resnet50" else SpectrogramViT
    assert isinstance(model.audio_encoder.encoder, expected)
    got = model.audio_encoder.encoder.backbone.state_dict()
    for name, value in reference.backbone.state_dict().items():
        assert torch.equal(got[name], value)
    # Without loading weights the architecture still comes from the reference's config.
    skeleton = build_gpa(cfg, load_weights=False)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {
        k: v.shape for k, v in model.state_dict().items()
    }
    assert _embed_clips(model, cfg).shape == (2, 16)


def _audioformer_checkpoint(directory: Path, cfg: Config) -> AudioFormerEncoder:
    """An FT1 training checkpoint as the fine-tuning job writes it."""
    encoder = AudioFormerEncoder.from_config(cfg.audioformer)
    classifier = AudioFormerClassifier(encoder, n_classes=3)
    checkpoints.save_train_checkpoint(
        str(directory),
        model_state=classifier.state_dict(),
        optimizer_state={},
        train_state=checkpoints.TrainState(epoch=1, step=4),
        task="ft1",
        loop_state={},
        cfg=cfg,
    )
    return encoder


def test_audioformer_tower_from_a_finetuning_checkpoint(text_dir: str, tmp_path: Path) -> None:
    base = _cfg(text_dir, kind="audioformer")
    cfg = dataclasses.replace(base, audioformer=tiny_audioformer_config())
    reference = _audioformer_checkpoint(tmp_path / "ft1", cfg)
    with_weights = dataclasses.replace(
        cfg, audio_encoder=dataclasses.replace(cfg.audio_encoder, weights=str(tmp_path / "ft1"))
    )
    model = build_gpa(with_weights)
    for name, value in reference.state_dict().items():
        assert torch.equal(model.audio_encoder.encoder.state_dict()[name], value)
    ids = tiny_code_ids(batch=2, n_codes=20)
    with torch.no_grad():
        emb = model.eval().embed_audio({"input_ids": ids, "attention_mask": (ids != 1).long()})
    assert emb.global_.shape == (2, 16)
    wider = dataclasses.replace(
        with_weights, audioformer=dataclasses.replace(cfg.audioformer, hidden_size=64)
    )
    with pytest.raises(ValueError, match="hidden_size: checkpoint 32 vs config 64"):
        build_gpa(wider)


def test_text_encoder_without_weights_has_the_same_layout(text_dir: str) -> None:
    cfg = _cfg(text_dir)
    loaded = build_text_encoder(cfg)
    skeleton = build_text_encoder(cfg, load_weights=False)
    assert loaded.state_dict().keys() == skeleton.state_dict().keys()
    assert loaded.tokenize(["a dog barks"])["input_ids"].tolist() == (
        skeleton.tokenize(["a dog barks"])["input_ids"].tolist()
    )
    frozen = build_text_encoder(
        dataclasses.replace(cfg, text=TextConfig(model=text_dir, trainable_layers=0))
    )
    assert frozen.frozen


def test_unknown_kind_is_an_error(text_dir: str) -> None:
    with pytest.raises(ValueError, match="unknown audio_encoder.kind 'wav2vec'"):
        build_audio_encoder(
            dataclasses.replace(_cfg(text_dir), audio_encoder=AudioEncoderConfig(kind="wav2vec"))
        )


@pytest.mark.parametrize(
    ("preset", "global_batch", "lr"),
    [("audiocaps_gpa", 32, 1e-4), ("clotho_gpa", 24, 5e-5), ("esc50_gpa", 64, 1e-3)],
)
def test_gpa_presets(preset: str, global_batch: int, lr: float) -> None:
    cfg = load_config(preset)
    # train.batch_size is per worker; the gathered negatives make the global batch.
    assert cfg.train.batch_size * cfg.train.num_workers == global_batch
    assert cfg.train.lr == lr and cfg.train.gather_negatives
    assert cfg.audio_encoder.kind in AUDIO_KINDS and cfg.gpa.n_prototypes == 3
    if preset != "esc50_gpa":
        assert (cfg.train.epochs, cfg.train.lr_step_epochs, cfg.train.lr_gamma) == (50, 20, 0.1)
        assert cfg.train.use_gpu and cfg.text.model == "bert-base-uncased"


@pytest.mark.parametrize("preset", ["audiocaps_gpa", "clotho_gpa"])
def test_gpa_paper_presets_build_resnet38(preset: str) -> None:
    """GPA 2.2 / 3.1: PANNs ResNet-38 without its last two linear layers, at paper width,
    SpecAugment after bn0 with PANNs' stripes and no time stretch."""
    cfg = load_config(preset)
    with torch.device("meta"):
        tower = build_audio_encoder(cfg, load_weights=False)
    encoder = tower.encoder
    assert isinstance(encoder, ResNet38) and tower.out_dim == 2048
    assert not any(name.startswith(("fc1.", "fc_audioset.")) for name in encoder.state_dict())
    # PANNs' ResNet38 has 73,783,247 parameters with fc1 (2048^2 + 2048) and fc_audioset
    # (2048 * 527 + 527) = 5,276,175 of them.
    assert sum(p.numel() for p in encoder.parameters()) == 73_783_247 - 5_276_175
    masks = encoder.spec_augmenter
    assert (masks.time_masks, masks.time_width, masks.freq_masks, masks.freq_width) == (
        2,
        64,
        2,
        8,
    )
    assert (cfg.features.time_stretch_min, cfg.features.time_stretch_max) == (1.0, 1.0)


def test_spec_augment_off_builds_no_masks(text_dir: str) -> None:
    cfg = _cfg(text_dir, kind="resnet38", width=2, spec_augment=False)
    assert build_audio_encoder(cfg).encoder.spec_augmenter is None

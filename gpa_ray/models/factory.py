"""Build the GPA model and its towers from a resolved `Config`: the one place that does it.

Training, the bias job, evaluation, index building and Serve all call `build_gpa`, so a
checkpoint's `config.yaml` rebuilds exactly the architecture its `model.pt` was trained
with (`load_gpa`, reading the files `gpa_ray.checkpoints` lays out).

Audio towers (`audio_encoder.kind`) and where their weights come from (`weights`, by
reference: nothing is ever downloaded implicitly):

- `cnn14`, `resnet38`: PANNs CNNs on log-mel (`features.n_mels` bins), width
  `audio_encoder.width`; `weights` a PANNs checkpoint path/URI, loaded strictly (the
  published files load; any other key set fails, `gpa_ray.models.panns_checkpoint`).
  With `audio_encoder.spec_augment` they mask their `bn0` output in training
  (`features.time_masks`, ...; `gpa_ray.models.audio_cnn.StripeMasks`).
- `aisfx`: the aiSFX sound-effects CNN on its own 96-band front end; `weights`
  `pkg:aisfx` (or `pretrained`) loads the checkpoint shipped in the installed package,
  any other path/URI a plain state dict.
- `audioformer`: the RoFormer backbone over EnCodec codes (`audioformer.*`); `weights`
  an MLM/FT1/FT2 training checkpoint URI, or a run URI (its latest checkpoint), whose
  codebook-1 backbone is used.
  Its architecture must equal `audioformer.*`, which is what a GPA checkpoint records.
- `resnet50`, `vit` (or `vit_b16`): ImageNet-style backbones on spectrogram images;
  `weights` a `transformers` checkpoint reference (hub cache id, folder, s3://, pkg:).

Every tower is wrapped in `gpa_ray.models.audio_tower.AudioTower`, which applies the
freezing policy `audio_encoder.trainable_layers` (-1 all, 0 none, n the last n blocks)
and, for a frozen tower, the output cache `audio_encoder.cache_size`. The wrapper is
always present, so state-dict keys do not depend on the freezing policy.

`load_weights=False` builds the same architecture without reading pretrained weights (a
checkpoint's state dict is about to replace them anyway): loading a GPA checkpoint then
never needs the towers' original weight files, only the text tokenizer and configs.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch
from torch import nn

from gpa_ray import storage
from gpa_ray.audio.inputs import KINDS as AUDIO_KINDS
from gpa_ray.checkpoints import (
    CONFIG_FILE,
    MODEL_FILE,
    CheckpointError,
    Which,
    encoder_from_checkpoint,
    read_config,
    read_weights,
    resolve_checkpoint,
)
from gpa_ray.config import Config, StorageConfig
from gpa_ray.models.audio_tower import AudioTower, audio_blocks
from gpa_ray.models.gpa import GPAModel
from gpa_ray.models.text import TextEncoder
from gpa_ray.pretrained import resolve_model_ref

logger = logging.getLogger(__name__)

AISFX_PACKAGE_WEIGHTS = ("pkg:aisfx", "pretrained")


def _aisfx(cfg: Config, load_weights: bool) -> nn.Module:
    from gpa_ray.models.aisfx_cnn import AisfxCNN, load_aisfx_state_dict
    from gpa_ray.models.panns_checkpoint import read_state_dict

    enc = cfg.audio_encoder
    model = AisfxCNN(width=enc.width)
    if load_weights and enc.weights:
        if enc.weights in AISFX_PACKAGE_WEIGHTS:
            state = load_aisfx_state_dict()
        else:
            state = read_state_dict(enc.weights, cfg.storage)
        model.load_state_dict(state, strict=True)
    return model


def _audioformer(cfg: Config, load_weights: bool) -> nn.Module:
    from gpa_ray.models.audioformer import AudioFormerEncoder

    weights = cfg.audio_encoder.weights
    if not (load_weights and weights):
        return AudioFormerEncoder.from_config(cfg.audioformer)
    return encoder_from_checkpoint(resolve_checkpoint(weights, "latest", cfg.storage), cfg)


def _spectrogram_vision(cfg: Config, load_weights: bool) -> nn.Module:
    from gpa_ray.audio.spectrogram import input_bins
    from gpa_ray.models.spectrogram_vision import build_spectrogram_vision

    enc = cfg.audio_encoder
    kind = "vit_b16" if enc.kind in ("vit", "vit_b16") else enc.kind
    n_mels = input_bins(cfg.features)  # mel bands, or linear STFT bins
    if enc.weights and not load_weights:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(resolve_model_ref(enc.weights, cfg.storage))
        return build_spectrogram_vision(kind, n_mels, config=config, channels=enc.channels)
    weights = enc.weights if load_weights else ""
    return build_spectrogram_vision(
        kind, n_mels, weights=weights, channels=enc.channels, storage_cfg=cfg.storage
    )


def build_audio_encoder(cfg: Config, load_weights: bool = True) -> AudioTower:
    """The audio tower `audio_encoder.kind`, with its weights and freezing policy."""
    enc = cfg.audio_encoder
    if enc.kind in ("cnn14", "resnet38"):
        from gpa_ray.models.audio_cnn import AUDIO_CNNS, StripeMasks
        from gpa_ray.models.panns_checkpoint import load_panns_weights

        masks = StripeMasks.from_features(cfg.features) if enc.spec_augment else None
        model: nn.Module = AUDIO_CNNS[enc.kind](
            n_mels=cfg.features.n_mels, width=enc.width, dropout=enc.dropout, masks=masks
        )
        if load_weights and enc.weights:
            load_panns_weights(model, enc.weights, storage_cfg=cfg.storage)
    elif enc.kind == "aisfx":
        model = _aisfx(cfg, load_weights)
    elif enc.kind == "audioformer":
        model = _audioformer(cfg, load_weights)
    elif enc.kind in ("resnet50", "vit", "vit_b16"):
        model = _spectrogram_vision(cfg, load_weights)
    else:
        raise ValueError(f"unknown audio_encoder.kind {enc.kind!r}; choose one of {AUDIO_KINDS}")
    if load_weights and not enc.weights:
        logger.info("audio tower %s starts from random weights", enc.kind)
    return AudioTower(model, audio_blocks(model), enc.trainable_layers, enc.cache_size)


def build_tokenizer(cfg: Config) -> Any:
    """The text tokenizer of `text.model` alone (for data pipelines that tokenise)."""
    from transformers import AutoTokenizer

    source = resolve_model_ref(cfg.text.model, cfg.storage, allow_download=cfg.text.allow_download)
    return AutoTokenizer.from_pretrained(source, local_files_only=not cfg.text.allow_download)


def build_text_encoder(cfg: Config, load_weights: bool = True) -> TextEncoder:
    """The text tower `text.model` with its pooling and freezing policy."""
    if load_weights:
        return TextEncoder.from_config(cfg.text, cfg.storage)
    from transformers import AutoConfig, AutoModel

    text = cfg.text
    source = resolve_model_ref(text.model, cfg.storage, allow_download=text.allow_download)
    config = AutoConfig.from_pretrained(source, local_files_only=not text.allow_download)
    return TextEncoder(
        AutoModel.from_config(config),
        build_tokenizer(cfg),
        max_length=text.max_length,
        pooling=text.pooling,
        trainable_layers=text.trainable_layers,
    )


def build_gpa(cfg: Config, load_weights: bool = True) -> GPAModel:
    """The GPA model of a config: audio tower, text tower, projections, prototypes, scorer."""
    return GPAModel(
        cfg.gpa, build_audio_encoder(cfg, load_weights), build_text_encoder(cfg, load_weights)
    )


def trainable_summary(model: nn.Module) -> dict[str, int]:
    """Trainable and total parameter counts (logged at the start of a run)."""
    params = list(model.parameters())
    return {
        "trainable": sum(p.numel() for p in params if p.requires_grad),
        "total": sum(p.numel() for p in params),
    }


@dataclasses.dataclass(frozen=True)
class LoadedGPA:
    """A GPA model rebuilt from a checkpoint, with what identifies it: the concrete
    checkpoint URI and the SHA-256 of the `model.pt` bytes it was loaded from."""

    model: GPAModel
    cfg: Config
    checkpoint: str
    digest: str


def load_gpa_checkpoint(
    uri: str,
    storage_cfg: StorageConfig | None = None,
    device: str | torch.device = "cpu",
    which: Which = "best",
) -> LoadedGPA:
    """Rebuild a GPA model from a checkpoint URI, or a run URI (its `which` checkpoint:
    the best by default), in eval mode on `device`.

    The architecture comes from `config.yaml` (`build_gpa` without the towers' pretrained
    weights: `model.pt` holds every parameter). The audio tower's training-time output
    cache (`audio_encoder.cache_size`) is left off. The returned config's storage is
    `storage_cfg` when given: what read this checkpoint reads what it names, and a written
    config holds no credentials (`gpa_ray.credentials`).
    """
    directory = resolve_checkpoint(uri, which, storage_cfg)
    if not storage.exists(storage.join(directory, CONFIG_FILE), storage_cfg):
        raise CheckpointError(f"GPA checkpoint {directory} has no {CONFIG_FILE}")
    cfg = read_config(directory, storage_cfg)
    if storage_cfg is not None:
        cfg = dataclasses.replace(cfg, storage=storage_cfg)
    # The frozen-tower output cache speeds up epochs over the same clips; inference
    # (index builds, queries) sees each clip once, so it would only hold memory.
    no_cache = dataclasses.replace(cfg.audio_encoder, cache_size=0)
    model = build_gpa(dataclasses.replace(cfg, audio_encoder=no_cache), load_weights=False)
    state, digest = read_weights(directory, storage_cfg)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{directory}/{MODEL_FILE} does not fit the GPA model its {CONFIG_FILE} describes: "
            f"{exc}"
        ) from exc
    return LoadedGPA(model.to(device).eval(), cfg, directory, digest)


def load_gpa(
    uri: str,
    storage_cfg: StorageConfig | None = None,
    device: str | torch.device = "cpu",
    which: Which = "best",
) -> tuple[GPAModel, Config]:
    """(model, its resolved config) of `load_gpa_checkpoint`: what most callers need."""
    loaded = load_gpa_checkpoint(uri, storage_cfg, device, which)
    return loaded.model, loaded.cfg

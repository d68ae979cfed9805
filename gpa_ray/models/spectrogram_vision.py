"""Image backbones on spectrograms: ResNet-50 and ViT-B/16 from `transformers`.

The transfer-learning study ("Good, Fast, Cheap") compares ImageNet backbones applied to
spectrograms with PANNs CNN14. Both backbones are built from `transformers` configs
(`ResNetModel`, `ViTModel`), so pretrained vision checkpoints load by reference (hub
cache, local folder, `s3://` folder, resolved by `gpa_ray.pretrained`), and tiny configs
exercise the same code in tests.

How a log-mel [B, T, M] becomes an image, and why:
- `bn0`, a BatchNorm over mel bins (as PANNs), maps dB values to a roughly unit range, the
  scale image backbones expect; it is learned with the projection.
- The image is [B, 3, M, T]: height = mel bins, width = time, so time stays a spatial axis
  that survives to the last feature map (frames).
- Three channels: `"repeat"` (default) copies the normalised log-mel into all three, which
  keeps the input statistics closest to what ImageNet filters saw (the usual choice when
  transferring image weights to audio); `"deltas"` stacks log-mel, delta and delta-delta
  (torchaudio `compute_deltas`), which adds temporal slope information for models
  trained from scratch.
- SpecAugment is not applied here: `gpa_ray.audio.inputs.AudioInputs` masks (and time
  stretches) the input spectrogram before this `bn0`, setting stripes to 0 in the input's
  own scale, as the study augments the spectrogram image itself. (The PANNs towers mask
  after their `bn0` instead, `gpa_ray.models.audio_cnn.StripeMasks`.)

Frames and global features:
- ResNet: the last feature map [B, C, M/32, T/32] averaged over frequency -> [B, T/32, C]
  (ceil division: every stride-2 layer pads); global = mean of the valid frames, which
  equals `ResNetModel`'s pooled output when nothing is padded.
- ViT: patch tokens (after the final LayerNorm) arranged as [M/p, T/p] and averaged over
  the frequency rows -> one frame per time column [B, T/p, D]; global = the [CLS] token
  (what `ViTForImageClassification` classifies from). Padded time columns are removed
  from attention with `attention_mask`, so [CLS] and valid tokens do not see padding.
  The config's (square) position grid is interpolated to the spectrogram's patch grid.
"""

from __future__ import annotations

import torch
import torchaudio
from torch import Tensor, nn
from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

from gpa_ray.config import StorageConfig
from gpa_ray.models.audio_cnn import frame_mask, init_bn
from gpa_ray.models.outputs import EncoderOutput
from gpa_ray.pretrained import resolve_model_ref

CHANNEL_MODES = ("repeat", "deltas")


def resnet50_config() -> ResNetConfig:
    """ResNet-50 (bottleneck blocks [3, 4, 6, 3], widths 256..2048), as microsoft/resnet-50."""
    return ResNetConfig(
        num_channels=3,
        embedding_size=64,
        hidden_sizes=[256, 512, 1024, 2048],
        depths=[3, 4, 6, 3],
        layer_type="bottleneck",
    )


def vit_b16_config() -> ViTConfig:
    """ViT-B/16: 12 layers x 768 x 12 heads, 16x16 patches, 224x224 position grid."""
    return ViTConfig(
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=3072,
        image_size=224,
        patch_size=16,
        num_channels=3,
    )


class SpectrogramImage(nn.Module):
    """Log-mel [B, T, M] -> normalised 3-channel image [B, 3, M, T]."""

    def __init__(self, n_mels: int, channels: str = "repeat") -> None:
        super().__init__()
        if channels not in CHANNEL_MODES:
            raise ValueError(f"channels must be one of {CHANNEL_MODES}, got {channels!r}")
        self.n_mels = n_mels
        self.channels = channels
        self.bn0 = nn.BatchNorm2d(n_mels)
        init_bn(self.bn0)

    def forward(self, logmel: Tensor) -> Tensor:
        if logmel.dim() != 3 or logmel.shape[-1] != self.n_mels:
            raise ValueError(f"expected log-mel [B, T, {self.n_mels}], got {tuple(logmel.shape)}")
        x = self.bn0(logmel.transpose(1, 2).unsqueeze(-1)).squeeze(-1)  # [B, M, T]
        if self.channels == "repeat":
            return x.unsqueeze(1).expand(-1, 3, -1, -1)
        delta = torchaudio.functional.compute_deltas(x)
        return torch.stack([x, delta, torchaudio.functional.compute_deltas(delta)], dim=1)


class SpectrogramResNet(nn.Module):
    """A `transformers` ResNet on a spectrogram image; see the module docstring."""

    def __init__(self, backbone: ResNetModel, n_mels: int = 64, channels: str = "repeat") -> None:
        super().__init__()
        self.image = SpectrogramImage(n_mels, channels)
        self.backbone = backbone
        self.out_dim = backbone.config.hidden_sizes[-1]

    def forward(self, logmel: Tensor, lengths: Tensor | None = None) -> EncoderOutput:
        fmap = self.backbone(self.image(logmel)).last_hidden_state  # [B, C, M', T']
        frames = fmap.mean(dim=2).transpose(1, 2)
        mask = frame_mask(lengths, logmel.shape[1], frames.shape[1], frames.shape[0], halvings=5)
        mask = mask.to(frames.device)
        weights = mask.unsqueeze(-1).to(frames.dtype)
        global_ = (frames * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return EncoderOutput(frames=frames, mask=mask, global_=global_)


class SpectrogramViT(nn.Module):
    """A `transformers` ViT on a spectrogram image; see the module docstring."""

    def __init__(self, backbone: ViTModel, n_mels: int = 64, channels: str = "repeat") -> None:
        super().__init__()
        self.patch = int(backbone.config.patch_size)
        if n_mels < self.patch:
            raise ValueError(f"need at least {self.patch} mel bins for {self.patch}-pixel patches")
        self.image = SpectrogramImage(n_mels, channels)
        self.backbone = backbone
        self.out_dim = backbone.config.hidden_size

    def forward(self, logmel: Tensor, lengths: Tensor | None = None) -> EncoderOutput:
        batch, n_time = logmel.shape[0], logmel.shape[1]
        rows, cols = self.n_mels_patches, n_time // self.patch
        if cols < 1:
            raise ValueError(f"need at least {self.patch} frames, got {n_time}")
        if lengths is None:
            col_mask = torch.ones(batch, cols, dtype=torch.bool, device=logmel.device)
        else:
            valid = torch.div(
                lengths.to(torch.long) + self.patch - 1, self.patch, rounding_mode="floor"
            )
            col_mask = (
                torch.arange(cols, device=logmel.device)[None, :] < valid.clamp(1, cols)[:, None]
            )
        # Patches are flattened row-major over [rows (frequency), cols (time)].
        token_mask = col_mask.unsqueeze(1).expand(-1, rows, -1).reshape(batch, rows * cols)
        cls_mask = torch.ones(batch, 1, dtype=torch.bool, device=logmel.device)
        attention_mask = torch.cat([cls_mask, token_mask], dim=1).long()
        out = self.backbone(
            self.image(logmel), interpolate_pos_encoding=True, attention_mask=attention_mask
        ).last_hidden_state
        patches = out[:, 1:].reshape(batch, rows, cols, -1)
        return EncoderOutput(frames=patches.mean(dim=1), mask=col_mask, global_=out[:, 0])

    @property
    def n_mels_patches(self) -> int:
        """Patch rows along frequency (the ViT's stride-p conv floors)."""
        return self.image.n_mels // self.patch


SpectrogramVision = SpectrogramResNet | SpectrogramViT


def build_spectrogram_vision(
    kind: str,
    n_mels: int = 64,
    weights: str = "",
    config: ResNetConfig | ViTConfig | None = None,
    channels: str = "repeat",
    storage_cfg: StorageConfig | None = None,
) -> SpectrogramVision:
    """Build `resnet50` or `vit_b16` on spectrograms.

    `weights`: a model reference (hub id in the local cache, folder path, `s3://` folder,
    `pkg:`) of a `transformers` checkpoint, loaded with `from_pretrained`; a classifier
    checkpoint (e.g. ResNetForImageClassification) loads its backbone. Empty: random
    init from `config` (default: the paper-scale config of `kind`).
    """
    if kind == "resnet50":
        if weights:
            path = resolve_model_ref(weights, storage_cfg)
            backbone: nn.Module = ResNetModel.from_pretrained(path)
        else:
            backbone = ResNetModel(config or resnet50_config())
        return SpectrogramResNet(backbone, n_mels=n_mels, channels=channels)
    if kind == "vit_b16":
        if weights:
            path = resolve_model_ref(weights, storage_cfg)
            backbone = ViTModel.from_pretrained(path, add_pooling_layer=False)
        else:
            backbone = ViTModel(config or vit_b16_config(), add_pooling_layer=False)
        return SpectrogramViT(backbone, n_mels=n_mels, channels=channels)
    raise ValueError(f"unknown spectrogram backbone {kind!r}; choose 'resnet50' or 'vit_b16'")

"""PANNs CNN14 and ResNet38 audio encoders on log-mel input.

The networks follow Kong et al., "PANNs: Large-Scale Pretrained Audio Neural Networks"
(the `audioset_tagging_cnn` code, `pytorch/models.py`): a BatchNorm over mel bins
(`bn0`), SpecAugment stripes on its output when training, then conv blocks of two 3x3
conv + BN + ReLU followed by 2x2 average pooling (CNN14), or a conv block, a [3, 4, 6, 3]
basic-block ResNet with average-pooling downsampling and a 2048-wide conv block
(ResNet38, GPA's audio tower). Parameter names are PANNs' own (`bn0`,
`conv_block1.conv1.weight`, `resnet.layer2.0.downsample.1.weight`, `conv_block_after1.*`)
so the published AudioSet checkpoints load strictly into these modules
(`gpa_ray.models.panns_checkpoint`).

What differs from PANNs, and why:
- The waveform front end (`spectrogram_extractor`, `logmel_extractor`) is not part of the
  module: log-mel is computed once by `gpa_ray.audio.features` (PANNs settings) so every
  encoder shares it, and it can be computed where the data lives.
- The two classifier layers (`fc1`, `fc_audioset`) are dropped, as GPA section 2.2 says:
  retrieval needs the frame sequence after frequency pooling ([B, T', C], the GPA audio
  frames) and the PANNs clip vector mean_t + max_t of that sequence (the global
  feature). Loading a published checkpoint drops exactly those keys and the front end's.
- With `lengths`, padded frames are excluded from the mean and max, so a short clip in a
  padded batch gets the same global feature as alone, and time stripes are drawn inside
  the clip's own frames. Without `lengths` this is exactly PANNs' pooling and masking.
- A `width` multiplier scales every channel count (64 = paper scale, so both networks end
  at 32 * width = 2048 channels); tiny widths make CPU tests fast with the same code path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpa_ray.config import FeaturesConfig, StorageConfig
from gpa_ray.models.outputs import EncoderOutput
from gpa_ray.models.panns_checkpoint import load_panns_weights

PAPER_WIDTH = 64
DOWNSAMPLE = 32
"""Both networks halve time (and frequency) five times: T' = T // 32."""


def init_layer(layer: nn.Conv2d | nn.Linear) -> None:
    """PANNs initialisation of a conv/linear layer: Xavier-uniform weight, zero bias."""
    nn.init.xavier_uniform_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)


def init_bn(bn: nn.BatchNorm2d) -> None:
    """PANNs initialisation of a BatchNorm: identity affine transform."""
    nn.init.ones_(bn.weight)
    nn.init.zeros_(bn.bias)


class ConvBlock(nn.Module):
    """Two 3x3 conv + BN + ReLU, then 'avg' (PANNs) or 'max' (DCASE baseline) pooling."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        init_layer(self.conv1)
        init_layer(self.conv2)
        init_bn(self.bn1)
        init_bn(self.bn2)

    def forward(
        self, x: Tensor, pool_size: tuple[int, int] = (2, 2), pool_type: str = "avg"
    ) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        if pool_type == "max":
            return F.max_pool2d(x, kernel_size=pool_size)
        return F.avg_pool2d(x, kernel_size=pool_size)


class BasicBlock(nn.Module):
    """PANNs' ResNet basic block: downsampling by 2x2 average pooling, not a strided conv.

    The last BN starts at zero weight so each residual block starts as the identity
    (PANNs' `zero_init_residual`), which is what makes the 38-layer net train from scratch.
    """

    def __init__(
        self, in_planes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        init_layer(self.conv1)
        init_bn(self.bn1)
        init_layer(self.conv2)
        init_bn(self.bn2)
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = F.avg_pool2d(x, kernel_size=(2, 2)) if self.stride == 2 else x
        out = F.relu(self.bn1(self.conv1(out)))
        out = F.dropout(out, p=0.1, training=self.training)
        out = self.bn2(self.conv2(out))
        identity = self.downsample(x) if self.downsample is not None else x
        return F.relu(out + identity)


class ResNetTrunk(nn.Module):
    """Four stages of basic blocks (PANNs `_ResNet`, layers [3, 4, 6, 3] for ResNet38)."""

    def __init__(self, width: int, layers: tuple[int, int, int, int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self._in_planes = width
        self.layer1 = self._make_layer(width, layers[0], stride=1)
        self.layer2 = self._make_layer(2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, layers[3], stride=2)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample: nn.Sequential | None = None
        if stride == 2:
            conv = nn.Conv2d(self._in_planes, planes, 1, bias=False)
            downsample = nn.Sequential(nn.AvgPool2d(kernel_size=2), conv, nn.BatchNorm2d(planes))
            init_layer(conv)
            init_bn(downsample[2])
        elif self._in_planes != planes:
            conv = nn.Conv2d(self._in_planes, planes, 1, bias=False)
            downsample = nn.Sequential(conv, nn.BatchNorm2d(planes))
            init_layer(conv)
            init_bn(downsample[1])
        modules = [BasicBlock(self._in_planes, planes, stride, downsample)]
        self._in_planes = planes
        modules.extend(BasicBlock(planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*modules)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


def frame_mask(
    lengths: Tensor | None, n_in: int, n_out: int, batch: int, halvings: int = 5
) -> Tensor:
    """Which of `n_out` output frames hold real input, given input `lengths` [B].

    Each 2x pooling maps input frames {2i, 2i+1} to output i, so an output frame is real
    if its window holds at least one real input frame: lengths -> ceil(lengths / 2),
    `halvings` times, then clipped to `n_out` (the floor pooling drops a ragged tail).
    Lengths are in input frames; None means every frame is real.
    """
    if lengths is None:
        return torch.ones(batch, n_out, dtype=torch.bool)
    n = lengths.to(torch.long).clamp(min=1, max=n_in)
    for _ in range(halvings):
        n = torch.div(n + 1, 2, rounding_mode="floor")
    n = n.clamp(max=n_out)
    return torch.arange(n_out, device=lengths.device)[None, :] < n[:, None]


def masked_mean_max(frames: Tensor, mask: Tensor) -> Tensor:
    """PANNs clip pooling mean_t + max_t over the valid frames only. frames [B, T, C]."""
    weights = mask.unsqueeze(-1).to(frames.dtype)
    mean = (frames * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    maxed = frames.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(1)
    return mean + maxed


def draw_stripe(total: int, max_width: int) -> tuple[int, int]:
    """(start, width) of one stripe as torchlibrosa's `DropStripes` draws it: width uniform
    in [0, max_width), start uniform in [0, total - width), from torch's global generator
    (which the training worker reseeds per epoch, as for dropout). The width is capped
    below `total` so a short clip still keeps a frame."""
    width = int(torch.randint(0, max(1, min(max_width, total)), (1,)))
    start = int(torch.randint(0, total - width, (1,)))
    return start, width


class StripeMasks(nn.Module):
    """PANNs' SpecAugmentation, applied by the tower to the output of `bn0` in training.

    Per example, `time_masks` stripes of frames and then `freq_masks` stripes of mel bins
    are set to 0, which after `bn0` is each bin's mean (the masked value carries no
    information and no level), as in PANNs and the DP baseline that GPA follows. PANNs
    uses 2 time stripes below 64 frames and 2 frequency stripes below 8 bins (the
    `features.*` defaults). In eval mode, and in a fully frozen tower (which
    `AudioTower` keeps in eval mode), the input passes unchanged. No parameters.
    """

    def __init__(self, time_masks: int, time_width: int, freq_masks: int, freq_width: int) -> None:
        super().__init__()
        self.time_masks = time_masks
        self.time_width = time_width
        self.freq_masks = freq_masks
        self.freq_width = freq_width

    @classmethod
    def from_features(cls, cfg: FeaturesConfig) -> StripeMasks:
        return cls(cfg.time_masks, cfg.time_mask_width, cfg.freq_masks, cfg.freq_mask_width)

    def keep_mask(self, shape: torch.Size, lengths: Tensor | None) -> Tensor:
        """A [B, 1, T, M] tensor of 1 (kept) and 0 (masked), time stripes inside each
        clip's `lengths` frames; drawn in torchlibrosa's order (time for every example,
        then frequency for every example)."""
        batch, _, frames, n_mels = shape
        keep = torch.ones(batch, 1, frames, n_mels)
        for b in range(batch):
            valid = frames if lengths is None else min(max(int(lengths[b]), 1), frames)
            for _ in range(self.time_masks):
                start, width = draw_stripe(valid, self.time_width)
                keep[b, :, start : start + width, :] = 0.0
        for b in range(batch):
            for _ in range(self.freq_masks):
                start, width = draw_stripe(n_mels, self.freq_width)
                keep[b, :, :, start : start + width] = 0.0
        return keep

    def forward(self, x: Tensor, lengths: Tensor | None = None) -> Tensor:
        if not self.training or (self.time_masks == 0 and self.freq_masks == 0):
            return x
        return x * self.keep_mask(x.shape, lengths).to(device=x.device, dtype=x.dtype)


class PannsEncoder(nn.Module):
    """Shared front and back of the PANNs encoders; subclasses define `trunk`.

    Input: log-mel [B, T, n_mels] (time first, as `gpa_ray.audio.features.LogMel` gives it).
    Output: `EncoderOutput` with frames [B, T // 32, 32 * width], their mask, and the
    global mean+max pooled feature [B, 32 * width]. `masks` (SpecAugment after `bn0`,
    training only) is off when None.
    """

    def __init__(
        self, n_mels: int, width: int, dropout: float, masks: StripeMasks | None = None
    ) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.width = width
        self.dropout = dropout
        self.out_dim = 32 * width
        self.bn0 = nn.BatchNorm2d(n_mels)
        init_bn(self.bn0)
        self.spec_augmenter = masks

    def trunk(self, x: Tensor) -> Tensor:
        """[B, 1, T, M] normalised log-mel -> [B, C, T // 32, M // 32] feature map."""
        raise NotImplementedError

    def forward(self, logmel: Tensor, lengths: Tensor | None = None) -> EncoderOutput:
        if logmel.dim() != 3 or logmel.shape[-1] != self.n_mels:
            raise ValueError(f"expected log-mel [B, T, {self.n_mels}], got {tuple(logmel.shape)}")
        if logmel.shape[1] < DOWNSAMPLE or self.n_mels < DOWNSAMPLE:
            raise ValueError(
                f"need at least {DOWNSAMPLE} frames and {DOWNSAMPLE} mel bins, "
                f"got {tuple(logmel.shape[1:])}"
            )
        x = logmel.unsqueeze(1)  # [B, 1, T, M]
        x = self.bn0(x.transpose(1, 3)).transpose(1, 3)  # BatchNorm over mel bins
        if self.spec_augmenter is not None:
            x = self.spec_augmenter(x, lengths)
        x = self.trunk(x)
        frames = x.mean(dim=3).transpose(1, 2)  # frequency mean -> [B, T', C]
        mask = frame_mask(lengths, logmel.shape[1], frames.shape[1], frames.shape[0])
        mask = mask.to(frames.device)
        return EncoderOutput(frames=frames, mask=mask, global_=masked_mean_max(frames, mask))


class Cnn14(PannsEncoder):
    """PANNs CNN14: six conv blocks, widths w, 2w, 4w, 8w, 16w, 32w (w = 64 in the paper)."""

    def __init__(
        self,
        n_mels: int = 64,
        width: int = PAPER_WIDTH,
        dropout: float = 0.2,
        masks: StripeMasks | None = None,
    ) -> None:
        super().__init__(n_mels, width, dropout, masks)
        widths = [1, width, 2 * width, 4 * width, 8 * width, 16 * width, 32 * width]
        for i in range(6):
            self.add_module(f"conv_block{i + 1}", ConvBlock(widths[i], widths[i + 1]))

    def trunk(self, x: Tensor) -> Tensor:
        for i in range(1, 7):
            block: ConvBlock = getattr(self, f"conv_block{i}")
            x = block(x, pool_size=(2, 2) if i < 6 else (1, 1))
            x = F.dropout(x, p=self.dropout, training=self.training)
        return x


class ResNet38(PannsEncoder):
    """PANNs ResNet38: a conv block, a [3, 4, 6, 3] basic-block ResNet, a 2048-wide block."""

    def __init__(
        self,
        n_mels: int = 64,
        width: int = PAPER_WIDTH,
        dropout: float = 0.2,
        masks: StripeMasks | None = None,
    ) -> None:
        super().__init__(n_mels, width, dropout, masks)
        self.conv_block1 = ConvBlock(1, width)
        self.resnet = ResNetTrunk(width)
        self.conv_block_after1 = ConvBlock(8 * width, 32 * width)

    def trunk(self, x: Tensor) -> Tensor:
        x = self.conv_block1(x, pool_size=(2, 2))
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = self.resnet(x)
        x = F.avg_pool2d(x, kernel_size=(2, 2))
        x = F.dropout(x, p=self.dropout, training=self.training)
        x = self.conv_block_after1(x, pool_size=(1, 1))
        return F.dropout(x, p=self.dropout, training=self.training)


AUDIO_CNNS: dict[str, type[PannsEncoder]] = {"cnn14": Cnn14, "resnet38": ResNet38}


def build_audio_cnn(
    kind: str,
    n_mels: int = 64,
    width: int = PAPER_WIDTH,
    weights: str = "",
    storage_cfg: StorageConfig | None = None,
    masks: StripeMasks | None = None,
) -> PannsEncoder:
    """Build `cnn14` or `resnet38`; `weights` is an optional checkpoint path/URI, loaded
    strictly (`gpa_ray.models.panns_checkpoint.load_panns_weights`)."""
    if kind not in AUDIO_CNNS:
        raise ValueError(f"unknown audio CNN {kind!r}; choose one of {sorted(AUDIO_CNNS)}")
    model = AUDIO_CNNS[kind](n_mels=n_mels, width=width, masks=masks)
    if weights:
        load_panns_weights(model, weights, storage_cfg=storage_cfg)
    return model

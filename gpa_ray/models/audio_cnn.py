"""PANNs CNN14 and ResNet38 audio encoders on log-mel input.

The networks follow Kong et al., "PANNs: Large-Scale Pretrained Audio Neural Networks"
(the `audioset_tagging_cnn` code): a BatchNorm over mel bins (`bn0`), conv blocks of two
3x3 conv + BN + ReLU followed by 2x2 average pooling, and a final block without pooling.
Parameter names are PANNs' own (`bn0`, `conv_block1.conv1.weight`, `resnet.layer2.0.
downsample.1.weight`, ...) so the official AudioSet checkpoints load into these modules.

What differs from PANNs, and why:
- The waveform front end (`spectrogram_extractor`, `logmel_extractor`) is not part of the
  module: log-mel is computed once by `gpa_ray.audio.features` (PANNs settings) so every
  encoder shares it, and it can be computed where the data lives.
- The two classifier layers (`fc1`, `fc_audioset`) are dropped: retrieval needs the frame
  sequence after frequency pooling ([B, T', C], the GPA audio frames) and the PANNs
  clip vector mean_t + max_t of that sequence (the global feature). Loading an official
  checkpoint therefore reports those keys as unexpected.
- With `lengths`, padded frames are excluded from the mean and max, so a short clip in a
  padded batch gets the same global feature as alone. Without `lengths` this is exactly
  PANNs' pooling.
- A `width` multiplier scales every channel count (64 = paper scale, so CNN14 ends at
  32 * width = 2048 channels); tiny widths make CPU tests fast with the same code path.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpa_ray.config import StorageConfig
from gpa_ray.models.outputs import EncoderOutput

log = logging.getLogger(__name__)

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


class PannsEncoder(nn.Module):
    """Shared front and back of the PANNs encoders; subclasses define `trunk`.

    Input: log-mel [B, T, n_mels] (time first, as `gpa_ray.audio.features.LogMel` gives it).
    Output: `EncoderOutput` with frames [B, T // 32, 32 * width], their mask, and the
    global mean+max pooled feature [B, 32 * width].
    """

    def __init__(self, n_mels: int, width: int, dropout: float) -> None:
        super().__init__()
        self.n_mels = n_mels
        self.width = width
        self.dropout = dropout
        self.out_dim = 32 * width
        self.bn0 = nn.BatchNorm2d(n_mels)
        init_bn(self.bn0)

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
        x = self.trunk(x)
        frames = x.mean(dim=3).transpose(1, 2)  # frequency mean -> [B, T', C]
        mask = frame_mask(lengths, logmel.shape[1], frames.shape[1], frames.shape[0])
        mask = mask.to(frames.device)
        return EncoderOutput(frames=frames, mask=mask, global_=masked_mean_max(frames, mask))


class Cnn14(PannsEncoder):
    """PANNs CNN14: six conv blocks, widths w, 2w, 4w, 8w, 16w, 32w (w = 64 in the paper)."""

    def __init__(self, n_mels: int = 64, width: int = PAPER_WIDTH, dropout: float = 0.2) -> None:
        super().__init__(n_mels, width, dropout)
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

    def __init__(self, n_mels: int = 64, width: int = PAPER_WIDTH, dropout: float = 0.2) -> None:
        super().__init__(n_mels, width, dropout)
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


def read_state_dict(
    source: str | Mapping[str, Tensor], storage_cfg: StorageConfig | None = None
) -> dict[str, Tensor]:
    """A state dict from a mapping, or from a checkpoint at a local path or URI.

    Official PANNs checkpoints wrap the weights as `{"model": state_dict, ...}`; plain
    state dicts (as `torch.save(model.state_dict())` writes) are accepted as they are.
    Loading uses `weights_only=True`: a checkpoint is data, never code.
    """
    if isinstance(source, Mapping):
        obj: object = source
    else:
        from gpa_ray import storage

        data = storage.read_bytes(source, storage_cfg=storage_cfg)
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    if not isinstance(obj, Mapping):
        raise ValueError(f"checkpoint does not hold a state dict (got {type(obj).__name__})")
    return dict(obj)


def load_panns_weights(
    model: PannsEncoder,
    source: str | Mapping[str, Tensor],
    strict: bool = False,
    storage_cfg: StorageConfig | None = None,
) -> tuple[list[str], list[str]]:
    """Load PANNs-named weights into `model`; returns (missing_keys, unexpected_keys).

    `strict=False` (the default) is for official PANNs checkpoints, whose front-end
    buffers and classifier (`spectrogram_extractor.*`, `logmel_extractor.*`, `fc1.*`,
    `fc_audioset.*`) have no place here; both lists are logged so a wrong file (nothing
    matched) is visible. A shape mismatch (e.g. another `width`) always raises.
    """
    state = read_state_dict(source, storage_cfg)
    result = model.load_state_dict(state, strict=strict)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        log.warning("audio CNN weights: %d missing keys: %s", len(missing), missing)
    if unexpected:
        log.info("audio CNN weights: %d unused keys: %s", len(unexpected), unexpected)
    return missing, unexpected


def build_audio_cnn(
    kind: str,
    n_mels: int = 64,
    width: int = PAPER_WIDTH,
    weights: str = "",
    storage_cfg: StorageConfig | None = None,
) -> PannsEncoder:
    """Build `cnn14` or `resnet38`; `weights` is an optional checkpoint path/URI."""
    if kind not in AUDIO_CNNS:
        raise ValueError(f"unknown audio CNN {kind!r}; choose one of {sorted(AUDIO_CNNS)}")
    model = AUDIO_CNNS[kind](n_mels=n_mels, width=width)
    if weights:
        load_panns_weights(model, weights, strict=False, storage_cfg=storage_cfg)
    return model

"""The pretrained aiSFX sound-effects CNN, with its Essentia front end rebuilt in torch.

The `aisfx` package (Ma & Lerch, "Representation Learning for the Automatic Indexing of
Sound Effects Libraries", ISMIR 2022) ships real pretrained weights: the 9-layer DCASE
cross-task baseline CNN ("X-Sequential-CE"), 512-d, in `aisfx/models/checkpoint.pth`.
It is one of the few pretrained audio encoders that installs offline here, so the
project uses it as a real pretrained audio tower.

The package's documented pipeline (`aisfx.inference.main`) is:

1. Essentia streaming chain at 44.1 kHz (`spectrogram_essentia.compute_spectrogram`):
   `EasyLoader` (mono; default replayGain -6 dB + 6 dB preamp = gain 1) ->
   `FrameCutter(2048, 1024)` (first frame centred on sample 0, frames until one is
   centred at or past the end: ceil(L / 1024) + 1 frames) -> symmetric Hann window, not
   normalised -> magnitude spectrum -> `MelBands` (96 bands, 0-22050 Hz, HTK mel,
   triangles weighted in mel, each band's weights summing to 1, applied to the power
   spectrum) -> log10(1e4 * S + 1).
2. `spectrogram_normalize(spec, "original")`: divide by 9.457798957824707.
3. `blocking`: 100-frame blocks, hop 50, a ragged last block dropped.
4. `EmbeddingNet('max', 3, 1, 64)`: four conv blocks (64, 128, 256, 512 channels; 2x2
   max pooling after the first three), mean over frequency, max over time -> 512-d.

`AisfxFrontEnd` is step 1-2 in torch (batched, differentiable, GPU-capable), `AisfxCNN`
is step 4 as our own module loading the package's state dict, and
`AisfxCNN.block_embeddings` is step 3-4 (the package's clip output). `AisfxCNN.forward`
gives the tower interface: the frame sequence [B, T // 8, 512] of the whole clip and
its max over valid frames, which equals the package embedding for a one-block input.

One Essentia detail is left out on purpose: `FrameCutter` adds -100 dB noise to
all-silent frames; after log compression that changes a normalised value by about
1e-5, so silent frames come out as exact zeros here instead.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpa_ray.models.audio_cnn import ConvBlock, frame_mask
from gpa_ray.models.outputs import EncoderOutput

SAMPLE_RATE = 44100
FRAME_SIZE = 2048
HOP_SIZE = 1024
N_MELS = 96
F_MIN = 0.0
F_MAX = 22050.0
NORM_MAX = 9.457798957824707
"""`spectrogram_normalize(..., "original")`: max over the paper's training spectrograms."""
BLOCK_FRAMES = 100
BLOCK_HOP = 0.5
EMBED_DIM = 512
CHECKPOINT = "models/checkpoint.pth"


def _hz2mel10(hz: np.float32) -> np.float32:
    """Essentia `hz2mel10`: computed in double, stored as float."""
    return np.float32(2595.0 * math.log10(float(hz) / 700.0 + 1.0))


def _mel102hz(mel: np.float32) -> np.float32:
    """Essentia `mel102hz`: computed in double, stored as float."""
    return np.float32(700.0 * (10.0 ** (float(mel) / 2595.0) - 1.0))


def essentia_mel_filterbank(
    sample_rate: float = SAMPLE_RATE,
    frame_size: int = FRAME_SIZE,
    n_mels: int = N_MELS,
    f_min: float = F_MIN,
    f_max: float = F_MAX,
) -> np.ndarray:
    """Essentia's `MelBands(htkMel, weighting='warping', normalize='unit_sum')` weights.

    Follows `MelBands::calculateFilterFrequencies` and `TriangularBands::createFilters`
    step by step in float32 (Essentia's `Real`), so edge bins and weights come out as
    Essentia's own. Returns [n_mels, frame_size // 2 + 1] float32.
    """
    f32 = np.float32
    n_bins = frame_size // 2 + 1
    low, high = _hz2mel10(f32(f_min)), _hz2mel10(f32(f_max))
    increment = f32((high - low) / f32(n_mels + 1))
    edges = []
    mel = low
    for _ in range(n_mels + 2):
        edges.append(_mel102hz(mel))
        mel = f32(mel + increment)
    scale = f32((float(f32(sample_rate)) / 2.0) / (n_bins - 1))
    weights = np.zeros((n_mels, n_bins), dtype=np.float32)
    for i in range(n_mels):
        lo, mid, hi = edges[i], edges[i + 1], edges[i + 2]
        step_up = f32(_hz2mel10(mid) - _hz2mel10(lo))
        step_down = f32(_hz2mel10(hi) - _hz2mel10(mid))
        first, last = math.ceil(f32(lo / scale)), math.floor(f32(hi / scale))
        total = f32(0.0)
        for j in range(first, last + 1):
            freq = f32(j * scale)
            if freq < mid:
                w = f32((_hz2mel10(freq) - _hz2mel10(lo)) / step_up)
            else:
                w = f32((_hz2mel10(hi) - _hz2mel10(freq)) / step_down)
            weights[i, j] = w
            total = f32(total + w)
        weights[i, first : last + 1] /= total
    return weights


def n_frames(n_samples: int | Tensor, hop: int = HOP_SIZE) -> int | Tensor:
    """Frames Essentia's streaming `FrameCutter` yields for `n_samples` (even frame size).

    Frame k is centred on sample k * hop; the last frame is the first one centred at or
    past the end, so there are ceil(n / hop) + 1 frames.
    """
    if isinstance(n_samples, Tensor):
        return torch.div(n_samples + hop - 1, hop, rounding_mode="floor") + 1
    return -(-n_samples // hop) + 1


class AisfxFrontEnd(nn.Module):
    """Waveform at 44.1 kHz [B, L] -> aiSFX log-mel [B, T, 96] (Essentia chain in torch).

    With `lengths` (samples per clip) each clip's frames are exactly what it gets alone:
    Essentia zero-pads past the end, and so does the padded batch. `normalize=False`
    gives the package's `compute_spectrogram` output (before `spectrogram_normalize`).
    """

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize
        window = torch.hann_window(FRAME_SIZE, periodic=False, dtype=torch.float64)
        self.register_buffer("window", window.float(), persistent=False)
        self.register_buffer(
            "mel_weights", torch.from_numpy(essentia_mel_filterbank()).T.contiguous(), False
        )

    def forward(
        self, waveform: Tensor, lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Returns (log-mel [B, T, 96], frames per clip [B] or None)."""
        if waveform.dim() != 2:
            raise ValueError(f"expected waveform [B, L], got {tuple(waveform.shape)}")
        total = int(n_frames(waveform.shape[1]))
        left = (FRAME_SIZE + 1) // 2
        right = (total - 1) * HOP_SIZE + FRAME_SIZE - left - waveform.shape[1]
        padded = F.pad(waveform.float(), (left, right))
        frames = padded.unfold(-1, FRAME_SIZE, HOP_SIZE)  # [B, T, N]
        power = torch.fft.rfft(frames * self.window).abs().square()
        spec = torch.log10(1e4 * (power @ self.mel_weights) + 1.0)
        if self.normalize:
            spec = spec / NORM_MAX
        frame_lengths = None if lengths is None else n_frames(lengths.to(torch.long))
        return spec, frame_lengths


def block_starts(n: int, block: int = BLOCK_FRAMES, hop_fraction: float = BLOCK_HOP) -> list[int]:
    """First frame of each block, as `aisfx.preprocessing.blocking` with a dropped tail."""
    hop = int(np.round(block * hop_fraction))
    count = math.ceil((n - block) / hop + 1)
    if (n - block) % hop != 0:
        count -= 1
    return [i * hop for i in range(max(count, 1))]


class AisfxCNN(nn.Module):
    """The aiSFX `EmbeddingNet` (DCASE 9-layer CNN, max pooling) as a tower.

    Input: aiSFX log-mel [B, T, 96] (time first, `AisfxFrontEnd` output), T >= 8.
    Output: frames [B, T // 8, 512] (after frequency mean), their mask, and the max over
    valid frames [B, 512] (the package's pooling). Parameter names are the package's
    (`conv_block1.conv1.weight`, ...), so its state dict loads with strict matching; an
    unloaded model starts from PANNs' Xavier init rather than the package's Kaiming init.
    """

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.out_dim = 8 * width
        self.conv_block1 = ConvBlock(1, width)
        self.conv_block2 = ConvBlock(width, 2 * width)
        self.conv_block3 = ConvBlock(2 * width, 4 * width)
        self.conv_block4 = ConvBlock(4 * width, 8 * width)

    def feature_map(self, spec: Tensor) -> Tensor:
        """[B, T, M] -> frame sequence [B, T // 8, C] (frequency-averaged)."""
        x = spec.unsqueeze(1)
        x = self.conv_block1(x, pool_size=(2, 2), pool_type="max")
        x = self.conv_block2(x, pool_size=(2, 2), pool_type="max")
        x = self.conv_block3(x, pool_size=(2, 2), pool_type="max")
        x = self.conv_block4(x, pool_size=(1, 1), pool_type="max")
        return x.mean(dim=3).transpose(1, 2)

    def forward(self, spec: Tensor, lengths: Tensor | None = None) -> EncoderOutput:
        if spec.dim() != 3 or spec.shape[1] < 8:
            raise ValueError(f"expected log-mel [B, T >= 8, M], got {tuple(spec.shape)}")
        frames = self.feature_map(spec)
        mask = frame_mask(lengths, spec.shape[1], frames.shape[1], frames.shape[0], halvings=3)
        mask = mask.to(frames.device)
        global_ = frames.masked_fill(~mask.unsqueeze(-1), float("-inf")).amax(dim=1)
        return EncoderOutput(frames=frames, mask=mask, global_=global_)

    def block_embeddings(self, spec: Tensor, hop_fraction: float = BLOCK_HOP) -> Tensor:
        """The package's clip output: one 512-d embedding per 100-frame block.

        spec: one clip's log-mel [T, 96]. Blocks as `aisfx.preprocessing.blocking`
        (zero-padded when the clip is shorter than a block), then `get_embedding`.
        """
        starts = block_starts(spec.shape[0], BLOCK_FRAMES, hop_fraction)
        padded = F.pad(spec, (0, 0, 0, BLOCK_FRAMES))
        blocks = torch.stack([padded[s : s + BLOCK_FRAMES] for s in starts])
        return self.feature_map(blocks).amax(dim=1)


def checkpoint_path() -> Path:
    """The checkpoint inside the installed `aisfx` package (never any other file)."""
    spec = importlib.util.find_spec("aisfx")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "the aisfx package is not installed; install it with `pip install --no-deps aisfx`"
        )
    return Path(spec.origin).parent / CHECKPOINT


def checkpoint_safe_globals() -> torch.serialization.safe_globals:
    """Allow-list for the package checkpoint's pickle (numpy ints in its dataset dict).

    The checkpoint is a tuple (state dict, {dataset: (np.int64 index, n_classes)});
    with these three numpy types allowed it loads with `weights_only=True`, so loading
    it never runs arbitrary code.
    """
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import scalar
    return torch.serialization.safe_globals(
        [(scalar, "numpy.core.multiarray.scalar"), np.dtype, type(np.dtype(np.int64))]
    )


def load_aisfx_state_dict() -> dict[str, Tensor]:
    """The package's `EmbeddingNet` weights, prefix `embedding_net.` removed, heads dropped."""
    with checkpoint_safe_globals():
        weights, _datasets = torch.load(checkpoint_path(), map_location="cpu", weights_only=True)
    prefix = "embedding_net."
    return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}


def build_aisfx_encoder(pretrained: bool = True) -> AisfxCNN:
    """The aiSFX CNN, with the package's pretrained weights unless `pretrained=False`."""
    model = AisfxCNN()
    if pretrained:
        model.load_state_dict(load_aisfx_state_dict(), strict=True)
    return model

"""The one output type every encoder tower returns.

GPA needs three things from a tower: per-frame (or per-token) features to build prototypes
from, which of those frames are real (padding must not leak into prototypes or pooling),
and one global vector for the global similarity s_g. Every audio encoder (CNN14, ResNet38,
the aisfx CNN, ResNet-50/ViT on spectrograms, AudioFormer) returns exactly this, so the
GPA model and the training loops never branch on the encoder kind.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass(frozen=True)
class EncoderOutput:
    """Frame features, their validity mask and a global feature of one batch.

    Attributes:
        frames: [B, N, D] float features, one per frame/token.
        mask: [B, N] bool, True where the frame holds real (non-padded) input.
        global_: [B, D] float clip/sentence-level feature.
    """

    frames: Tensor
    mask: Tensor
    global_: Tensor

"""Prototype generators: K learned summaries of a frame/token sequence plus its global feature.

GPA aligns audio and text not only through one global vector each but through K+1
"prototypes" per item, so that a caption mentioning two sound events can match two parts
of a clip. Both generators take a feature sequence x [B, N, D] with a padding mask
[B, N] (True = real position) and the item's global feature g [B, D] (the caller decides
what it is: [CLS] or mean tokens for text, mean+max pooled frames for audio) and return
[B, K+1, D]: K sequence prototypes followed by g.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

PROTOTYPE_KINDS = ("mask", "attention")


class MaskPrototypes(nn.Module):
    """GPA eq 1: p_k = sum_j x_j * relu(Linear(x_j))_k over valid positions j, k = 1..K.

    Each position scores its membership in each of the K prototypes; relu keeps the
    memberships non-negative (a soft mask), and padding positions get zero membership.
    The sum is not normalised, exactly as in the equation; the projection MLP and the
    L2 normalisation that follow make the scale irrelevant to cosine scores.
    """

    def __init__(self, dim: int, n_prototypes: int) -> None:
        super().__init__()
        self.n_prototypes = n_prototypes
        self.membership = nn.Linear(dim, n_prototypes)

    def forward(self, frames: Tensor, mask: Tensor, global_: Tensor) -> Tensor:
        weights = torch.relu(self.membership(frames)) * mask.unsqueeze(-1).to(frames.dtype)
        prototypes = torch.einsum("bnk,bnd->bkd", weights, frames)
        return torch.cat([prototypes, global_.unsqueeze(1)], dim=1)


class AttentionPrototypes(nn.Module):
    """The paper's ablation: K learnable queries attend over the valid positions.

    Uses multi-head attention (`n_heads` must divide `dim`). An item without any valid
    position gets zero sequence prototypes rather than the NaN of an empty softmax.
    """

    def __init__(self, dim: int, n_prototypes: int, n_heads: int = 1) -> None:
        super().__init__()
        self.n_prototypes = n_prototypes
        self.queries = nn.Parameter(torch.randn(n_prototypes, dim) * dim**-0.5)
        self.attention = nn.MultiheadAttention(dim, n_heads, batch_first=True)

    def forward(self, frames: Tensor, mask: Tensor, global_: Tensor) -> Tensor:
        batch = frames.shape[0]
        empty = ~mask.any(1)
        padding = ~mask & ~empty.unsqueeze(1)
        queries = self.queries.unsqueeze(0).expand(batch, -1, -1)
        prototypes, _ = self.attention(
            queries, frames, frames, key_padding_mask=padding, need_weights=False
        )
        prototypes = prototypes.masked_fill(empty[:, None, None], 0.0)
        return torch.cat([prototypes, global_.unsqueeze(1)], dim=1)


def build_prototype_generator(
    kind: str, dim: int, n_prototypes: int, n_heads: int = 1
) -> MaskPrototypes | AttentionPrototypes:
    """`kind` "mask" (eq 1, the default) or "attention" (the ablation)."""
    if kind == "mask":
        return MaskPrototypes(dim, n_prototypes)
    if kind == "attention":
        return AttentionPrototypes(dim, n_prototypes, n_heads)
    raise ValueError(f"prototype generator must be one of {PROTOTYPE_KINDS}, got {kind!r}")

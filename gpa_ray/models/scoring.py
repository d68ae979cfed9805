"""Prototype scorers: reduce the prototype similarity matrix s_p of a pair to one number.

For an audio item with prototypes P_a [Ka, D] and a text with P_t [Kt, D] (both L2
normalised, Ka = Kt = K+1 in GPA), s_p = P_a @ P_t^T [Ka, Kt]: rows index audio
prototypes (i), columns index text prototypes (j). Every scorer here works on a batch
s_p [..., Ka, Kt] (typically [A, T, Ka, Kt] for all audio x text pairs) and returns [...].

LASS (GPA eqs 2-8), with L_a: Linear(Ka, Ka) always acting on vectors indexed by audio
prototypes and L_t: Linear(Kt, Kt) on vectors indexed by text prototypes:

audio-first branch s'_a
    w_a[i, j]        = softmax_i s_p[i, j]                       (per column j)
    wL_a[i, j]       = softmax_i (L_a(w_a[:, j]))_i              (L_a maps each column)
    s_a[j]           = sum_i wL_a[i, j] s_p[i, j]                 [Kt]
    wL_t[j]          = softmax_j (L_t(softmax(s_a)))_j
    s'_a             = sum_j wL_t[j] s_a[j]
text-first branch s'_t (roles swapped)
    wL_t[i, j]       = softmax_j (L_t(softmax_j s_p[i, :]))_j    (L_t maps each row)
    s_t[i]           = sum_j wL_t[i, j] s_p[i, j]                 [Ka]
    wL_a[i]          = softmax_i (L_a(softmax(s_t)))_i
    s'_t             = sum_i wL_a[i] s_t[i]
s'_p = s'_a + s'_t.

"L maps a vector v" means nn.Linear semantics: L(v) = W v + b,
i.e. L(v)_i = sum_i' W[i, i'] v_i' + b_i.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

SCORER_KINDS = ("lass", "mean", "softmax", "none")


def prototype_similarity(audio_prototypes: Tensor, text_prototypes: Tensor) -> Tensor:
    """s_p for every pair: [A, Ka, D] x [T, Kt, D] -> [A, T, Ka, Kt] (inner products)."""
    return torch.einsum("aid,tjd->atij", audio_prototypes, text_prototypes)


def _two_stage(s_p: Tensor, first: nn.Module | None, second: nn.Module | None, axis: int) -> Tensor:
    """Weighted pooling over `axis` (-2 audio rows or -1 text columns), then over the other.

    `first` re-weights along `axis`, `second` along the remaining axis; None means plain
    softmax weights. This is one branch of LASS (or of its softmax-weight ablation).
    """
    weights = torch.softmax(s_p, dim=axis)
    if first is not None:
        weights = torch.softmax(first(weights.transpose(axis, -1)).transpose(axis, -1), dim=axis)
    pooled = (weights * s_p).sum(axis)
    weights = torch.softmax(pooled, dim=-1)
    if second is not None:
        weights = torch.softmax(second(weights), dim=-1)
    return (weights * pooled).sum(-1)


class LASSScorer(nn.Module):
    """Learnable aggregation (GPA eqs 2-8), see the module docstring for the exact axes.

    L_a and L_t start as identities (W = I, b = 0), so before training LASS weighs the
    prototypes by their (twice-softmaxed) similarities, like `SoftmaxWeightScorer`, and
    learning moves it from a sensible point rather than from random weights.
    """

    def __init__(self, n_audio: int, n_text: int) -> None:
        super().__init__()
        self.l_a = nn.Linear(n_audio, n_audio)
        self.l_t = nn.Linear(n_text, n_text)
        for layer in (self.l_a, self.l_t):
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, s_p: Tensor) -> Tensor:
        audio_first = _two_stage(s_p, self.l_a, self.l_t, axis=-2)
        text_first = _two_stage(s_p, self.l_t, self.l_a, axis=-1)
        return audio_first + text_first


class SoftmaxWeightScorer(nn.Module):
    """Ablation: the same two branches with plain softmax weights (no L_a, L_t)."""

    def forward(self, s_p: Tensor) -> Tensor:
        return _two_stage(s_p, None, None, axis=-2) + _two_stage(s_p, None, None, axis=-1)


class MeanPoolScorer(nn.Module):
    """Ablation: the mean of all prototype similarities."""

    def forward(self, s_p: Tensor) -> Tensor:
        return s_p.mean(dim=(-2, -1))


def build_scorer(kind: str, n_audio: int, n_text: int) -> nn.Module | None:
    """ "lass", "mean", "softmax", or "none" (None: no prototype branch, the DP baseline)."""
    if kind == "lass":
        return LASSScorer(n_audio, n_text)
    if kind == "mean":
        return MeanPoolScorer()
    if kind == "softmax":
        return SoftmaxWeightScorer()
    if kind == "none":
        return None
    raise ValueError(f"prototype scorer must be one of {SCORER_KINDS}, got {kind!r}")

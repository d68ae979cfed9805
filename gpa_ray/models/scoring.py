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

Layout. The scorers reduce s_p with the prototype axes first, x = [Ka, Kt, *pairs]: then
every softmax, linear map and weighted sum over a prototype axis is an elementwise
operation across a few contiguous [*pairs] planes, which is several times faster than
reducing tiny trailing axes of size K+1 (pool scoring of the bias job, evaluation and
stage 2 of search spend most of their time here). `forward(s_p)` takes the natural
[..., Ka, Kt] layout; `score_pairs` builds x straight from the prototypes with one matrix
product and never makes the [A, T, Ka, Kt] layout at all.

Fused path. `LASSScorer.fused = True` (set by the Sinkhorn bias job) scores forward-only
float32 CPU pairs with `gpa_ray.models.fused_lass`, one C loop per pair instead of the
torch ops above; it is off by default, so training, evaluation and search keep the plain
path, which is its parity reference.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from gpa_ray.models import fused_lass

SCORER_KINDS = ("lass", "mean", "softmax", "none")


def prototype_similarity(audio_prototypes: Tensor, text_prototypes: Tensor) -> Tensor:
    """s_p for every pair: [A, Ka, D] x [T, Kt, D] -> [A, T, Ka, Kt] (inner products)."""
    return torch.einsum("aid,tjd->atij", audio_prototypes, text_prototypes)


def prototype_similarity_first(audio_prototypes: Tensor, text_prototypes: Tensor) -> Tensor:
    """s_p for every pair with the prototype axes first: [Ka, Kt, A, T], from one
    [Ka*A, D] x [D, Kt*T] matrix product."""
    n_audio, ka, dim = audio_prototypes.shape
    n_text, kt, _ = text_prototypes.shape
    audio = audio_prototypes.transpose(0, 1).reshape(ka * n_audio, dim)
    text = text_prototypes.transpose(0, 1).reshape(kt * n_text, dim)
    return (audio @ text.T).view(ka, n_audio, kt, n_text).transpose(1, 2)


def _linear_first(layer: nn.Linear, x: Tensor) -> Tensor:
    """`layer` applied to the vectors along axis 0 of x [K, *rest]: W x + b per position.

    mm then an in-place add: addmm with an inner dimension of K+1 is several times slower
    on CPU, and the product's output is not needed by its backward, so the add may be
    in place."""
    k = x.shape[0]
    flat = torch.mm(layer.weight, x.reshape(k, -1)).add_(layer.bias.unsqueeze(1))
    return flat.view(x.shape)


def _weights_first(v: Tensor, layer: nn.Linear | None) -> Tensor:
    """softmax over axis 0, or softmax(L(softmax(.))) with a learnable L along axis 0."""
    weights = torch.softmax(v, dim=0)
    if layer is None:
        return weights
    return torch.softmax(_linear_first(layer, weights), dim=0)


def _two_stage(x: Tensor, first: nn.Linear | None, second: nn.Linear | None) -> Tensor:
    """One branch of LASS (or of its softmax-weight ablation) on x [K1, K2, *pairs]:
    weighted pooling over axis 0 with weights re-mapped by `first`, then over the remaining
    prototype axis with weights re-mapped by `second`. Returns [*pairs]."""
    pooled = (_weights_first(x, first) * x).sum(0)
    return (_weights_first(pooled, second) * pooled).sum(0)


class PrototypeScorer(nn.Module, abc.ABC):
    """A reduction of each pair's s_p to one score; subclasses implement `reduce_first` on
    the prototype-first layout [Ka, Kt, *pairs]."""

    @abc.abstractmethod
    def reduce_first(self, x: Tensor) -> Tensor:
        """x [Ka, Kt, *pairs] -> scores [*pairs]."""

    def forward(self, s_p: Tensor) -> Tensor:
        """s_p [..., Ka, Kt] -> scores [...]."""
        return self.reduce_first(s_p.movedim((-2, -1), (0, 1)))

    #: Pairs per torch thread reduced per step by `score_pairs`. The reduction makes a
    #: dozen passes over [Ka, Kt, pairs] temporaries; at ~4k pairs a thread they stay in
    #: its core's L2 cache (a 128 x 512 block at once does not, and is ~1.1x slower).
    pairs_per_thread: int = 4096

    def score_pairs(self, audio_prototypes: Tensor, text_prototypes: Tensor) -> Tensor:
        """S'_p for every audio x text pair: [A, Ka, D] x [T, Kt, D] -> [A, T].

        One matrix product for the whole block (what keeps the products fast), then the
        reduction over runs of audio rows of about `pairs_per_thread` pairs per thread."""
        x = prototype_similarity_first(audio_prototypes, text_prototypes)
        n_audio, n_text = x.shape[2], x.shape[3]
        rows = max(1, self.pairs_per_thread * torch.get_num_threads() // max(1, n_text))
        if rows >= n_audio:
            return self.reduce_first(x)
        steps = [self.reduce_first(x[:, :, r : r + rows]) for r in range(0, n_audio, rows)]
        return torch.cat(steps)


class LASSScorer(PrototypeScorer):
    """Learnable aggregation (GPA eqs 2-8), see the module docstring for the exact axes.

    L_a and L_t start as identities (W = I, b = 0), so before training LASS weighs the
    prototypes by their (twice-softmaxed) similarities, like `SoftmaxWeightScorer`, and
    learning moves it from a sensible point rather than from random weights.
    """

    #: Score with the fused kernel where it applies (see `uses_fused`); off by default.
    fused: bool = False

    def __init__(self, n_audio: int, n_text: int) -> None:
        super().__init__()
        self.l_a = nn.Linear(n_audio, n_audio)
        self.l_t = nn.Linear(n_text, n_text)
        for layer in (self.l_a, self.l_t):
            nn.init.eye_(layer.weight)
            nn.init.zeros_(layer.bias)

    def uses_fused(self, audio_prototypes: Tensor, text_prototypes: Tensor) -> bool:
        """Whether `score_pairs` takes the fused kernel for these inputs: `fused` is set, no
        gradient is wanted, everything is float32 on CPU and the kernel builds here."""
        tensors = (audio_prototypes, text_prototypes, self.l_a.weight)
        return (
            self.fused
            and not torch.is_grad_enabled()
            and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
            and fused_lass.available(self.l_a.in_features, self.l_t.in_features)
        )

    def score_pairs(self, audio_prototypes: Tensor, text_prototypes: Tensor) -> Tensor:
        if self.uses_fused(audio_prototypes, text_prototypes):
            return fused_lass.lass_scores(audio_prototypes, text_prototypes, self.l_a, self.l_t)
        return super().score_pairs(audio_prototypes, text_prototypes)

    def reduce_first(self, x: Tensor) -> Tensor:
        audio_first = _two_stage(x, self.l_a, self.l_t)
        text_first = _two_stage(x.transpose(0, 1), self.l_t, self.l_a)
        return audio_first + text_first


class SoftmaxWeightScorer(PrototypeScorer):
    """Ablation: the same two branches with plain softmax weights (no L_a, L_t)."""

    def reduce_first(self, x: Tensor) -> Tensor:
        return _two_stage(x, None, None) + _two_stage(x.transpose(0, 1), None, None)


class MeanPoolScorer(PrototypeScorer):
    """Ablation: the mean of all prototype similarities."""

    def reduce_first(self, x: Tensor) -> Tensor:
        return x.mean(dim=(0, 1))


def build_scorer(kind: str, n_audio: int, n_text: int) -> PrototypeScorer | None:
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

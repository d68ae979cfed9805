"""Training losses for GPA (retrieval) and AudioFormer (classification, multi-positive).

Retrieval losses take similarity matrices that are already gathered across workers (the
gather-with-gradient helper lives with the training loops). Conventions:

- `sim` is [Q, K]: rows are audio queries, columns text keys (the a2t direction).
  Square case (Q == K, `positive_index` None): row i's positive is column i and the t2a
  direction is `sim.T`.
- Rectangular case (local queries x global keys, as with per-worker local losses): pass
  `positive_index` [Q] (the key column of each row's positive) and the t2a matrix `sim_t2a`
  (local texts x global audio) which has the same positive columns, because pairs are
  one-to-one and share their global index.
- `clip_ids` [K] (optional) names the clip of each key. A key of a different batch item
  with the same clip as the row's positive (another caption of the same clip) is removed
  from that row's negatives. The DP baseline intends this but its NT-Xent masks the log
  probabilities after the softmax, which leaves such pairs in the denominator; here they
  are removed from the softmax itself.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

CLASSIFICATION_LOSSES = ("lsep", "bce", "ce")


def _positive_index(sim: Tensor, positive_index: Tensor | None) -> Tensor:
    if positive_index is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"a rectangular similarity {tuple(sim.shape)} needs positive_index")
        return torch.arange(sim.shape[0], device=sim.device)
    if positive_index.shape != (sim.shape[0],):
        raise ValueError(
            f"positive_index must have shape ({sim.shape[0]},), got {tuple(positive_index.shape)}"
        )
    return positive_index.to(device=sim.device, dtype=torch.long)


def _second_direction(sim: Tensor, sim_t2a: Tensor | None, positive_index: Tensor | None) -> Tensor:
    if sim_t2a is not None:
        if sim_t2a.shape != sim.shape:
            raise ValueError(
                f"sim_t2a shape {tuple(sim_t2a.shape)} differs from sim {tuple(sim.shape)}"
            )
        return sim_t2a
    if positive_index is not None:
        raise ValueError("with positive_index, pass sim_t2a for the text-to-audio direction")
    return sim.T


def duplicate_mask(positive: Tensor, clip_ids: Tensor | None, n_keys: int) -> Tensor:
    """[Q, K] bool: True where key k is another item of the same clip as row q's positive.

    Triplet and NT-Xent/InfoNCE drop these keys from the row's negatives; CWCL gives them
    the full target weight of a match.
    """
    if clip_ids is None:
        return torch.zeros(positive.shape[0], n_keys, dtype=torch.bool, device=positive.device)
    rows = torch.arange(positive.shape[0], device=positive.device)
    clip_ids = clip_ids.to(positive.device)
    if clip_ids.shape != (n_keys,):
        raise ValueError(f"clip_ids must have shape ({n_keys},), got {tuple(clip_ids.shape)}")
    same = clip_ids[positive][:, None] == clip_ids[None, :]
    same[rows, positive] = False
    return same


def _triplet_rows(sim: Tensor, positive: Tensor, excluded: Tensor, margin: float) -> Tensor:
    """Per row: sum over negatives k of [margin - s(q, pos) + s(q, k)]_+."""
    pos_score = sim.gather(1, positive[:, None])
    cost = (margin + sim - pos_score).clamp_min(0)
    drop = excluded.clone()
    drop[torch.arange(sim.shape[0], device=sim.device), positive] = True
    return cost.masked_fill(drop, 0.0).sum(dim=1)


def triplet_sum_loss(
    sim: Tensor,
    margin: float = 0.2,
    *,
    sim_t2a: Tensor | None = None,
    positive_index: Tensor | None = None,
    clip_ids: Tensor | None = None,
) -> Tensor:
    """Hinge-based triplet loss summed over all negatives, both directions (GPA eq 11, VSE).

    L = mean_q sum_{k neg} [m - s(a_q, t_q) + s(a_q, t_k)]_+
      + mean_q sum_{k neg} [m - s(a_q, t_q) + s(a_k, t_q)]_+
    i.e. the two directions are added (as in eq 11) and each is averaged over anchors (as in
    the DP baseline implementation, which divides the summed cost by the batch size).
    """
    positive = _positive_index(sim, positive_index)
    other = _second_direction(sim, sim_t2a, positive_index)
    excluded = duplicate_mask(positive, clip_ids, sim.shape[1])
    a2t = _triplet_rows(sim, positive, excluded, margin).mean()
    t2a = _triplet_rows(other, positive, excluded, margin).mean()
    return a2t + t2a


def _cross_entropy_rows(logits: Tensor, positive: Tensor, excluded: Tensor) -> Tensor:
    """Per row: -log softmax(logits)[positive] with excluded keys out of the denominator."""
    masked = logits.masked_fill(excluded, float("-inf"))
    return F.cross_entropy(masked, positive, reduction="none")


def nt_xent_loss(
    sim: Tensor,
    temperature: float = 0.07,
    *,
    sim_t2a: Tensor | None = None,
    positive_index: Tensor | None = None,
    clip_ids: Tensor | None = None,
) -> Tensor:
    """NT-Xent as GPA eq 12: the SUM of both directions' cross-entropies over sim / tau.

    L = mean_q -log softmax_k(s(a_q, t_k)/tau)[q] + mean_q -log softmax_k(s(a_k, t_q)/tau)[q],
    i.e. -(1/B)(sum_i a2t_i + sum_i t2a_i) as eq 12 prints it, tau = 0.07 (GPA section 3.1).
    The DP baseline's code (which GPA follows) weights each direction by 1/2 instead; under
    Adam a constant factor on the loss changes the step only through gradient clipping
    (and Adam's epsilon), so eq 12 is followed here and the difference is stated.
    """
    positive = _positive_index(sim, positive_index)
    other = _second_direction(sim, sim_t2a, positive_index)
    excluded = duplicate_mask(positive, clip_ids, sim.shape[1])
    a2t = _cross_entropy_rows(sim / temperature, positive, excluded).mean()
    t2a = _cross_entropy_rows(other / temperature, positive, excluded).mean()
    return a2t + t2a


def info_nce_loss(
    sim: Tensor,
    *,
    positive_index: Tensor | None = None,
    clip_ids: Tensor | None = None,
) -> Tensor:
    """InfoNCE exactly as "Good, Fast, Cheap" eq 1: ONE direction, scale 1 (no temperature).

    L = -E_i log( exp(s_a,i . s_t,i) / sum_j exp(s_a,i . s_t,j) ),
    with s the L2-normalised embeddings, so the logits are plain cosine similarities in
    [-1, 1] (eq 1 has no temperature or learned scale). Direction: audio-to-text, each
    audio clip's caption is predicted among the batch's captions (rows of `sim` are audio
    queries, as everywhere here). Eq 1 as printed reuses the summation index i in its
    denominator; it is read as the standard InfoNCE of its reference [25] (the positive
    against every caption of the batch), with the audio as the anchor: the paper names no
    direction and no second term. `clip_ids` drops another caption of the anchor's own
    clip from the denominator (our choice, as for every loss here; the paper says nothing).

    Note: at scale 1 one row's loss lies in [log(1 + (N-1)e^-2), log(1 + (N-1)e^2)], e.g.
    at most 4.72 for N = 16, yet the paper's Table 4 lists a ViT training loss of 6.575
    at batch 16: the authors' code must have differed from eq 1 (a temperature, or both
    directions summed). The equation is what is implemented.
    """
    positive = _positive_index(sim, positive_index)
    excluded = duplicate_mask(positive, clip_ids, sim.shape[1])
    return _cross_entropy_rows(sim, positive, excluded).mean()


def cwcl_weights(
    row_features: Tensor, key_features: Tensor | None = None, same_clip: Tensor | None = None
) -> Tensor:
    """CWCL targets [Q, K]: w_qk = (1 + cos(t_q, t_k)) / 2, normalised to sum 1 per row.

    Features come from a frozen (locked) text encoder, so they are detached: the targets
    carry no gradient. `same_clip` [Q, K] (optional) marks pairs known to describe the same
    audio; their weight is set to 1, the weight of an exact match, before normalising.
    """
    keys = row_features if key_features is None else key_features
    dtype = torch.promote_types(row_features.dtype, torch.float32)
    rows_n = F.normalize(row_features.detach().to(dtype), dim=-1)
    keys_n = F.normalize(keys.detach().to(dtype), dim=-1)
    weights = (1.0 + rows_n @ keys_n.T) / 2.0
    if same_clip is not None:
        weights = weights.masked_fill(same_clip.to(weights.device), 1.0)
    return weights / weights.sum(dim=1, keepdim=True)


def cwcl_loss(
    sim: Tensor,
    text_features: Tensor,
    temperature: float = 0.07,
    *,
    sim_t2a: Tensor | None = None,
    positive_index: Tensor | None = None,
    clip_ids: Tensor | None = None,
) -> Tensor:
    """Continuously weighted contrastive loss (CWCL), text side locked.

    L = 1/2 * mean_q -sum_k w_qk log softmax_k(s_qk / tau) + 1/2 * (same on the t2a matrix),
    with w = row-normalised (1 + cos(t_q, t_k)) / 2 from the frozen text features
    `text_features` [K, D] of the keys (row q's features are those of its positive key).
    Both directions use the same weights: in t2a the text-text similarity stands in for the
    audio-audio similarity, which is the "lock the text encoder" variant the paper found best.
    With `clip_ids`, two items of the same clip are known to describe the same audio, so
    their weight is set to 1 (the weight of an exact match) before normalising.
    """
    positive = _positive_index(sim, positive_index)
    other = _second_direction(sim, sim_t2a, positive_index)
    same_clip = duplicate_mask(positive, clip_ids, sim.shape[1])
    features = text_features.to(sim.device)
    weights = cwcl_weights(features[positive], features, same_clip).to(sim.dtype)
    a2t = -(weights * F.log_softmax(sim / temperature, dim=1)).sum(dim=1).mean()
    t2a = -(weights * F.log_softmax(other / temperature, dim=1)).sum(dim=1).mean()
    return 0.5 * (a2t + t2a)


def lsep_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """LSEP (AudioFormer eq 7): mean_b log(1 + sum_{j not in pos} sum_{i in pos} exp(s_j - s_i)).

    The double sum factorises as exp(LSE_{j neg} s_j + LSE_{i pos} -s_i), so the loss is
    softplus(LSE_neg(s) + LSE_pos(-s)): finite for any logits. A sample with no positive or
    no negative label has an empty sum and contributes log(1) = 0.
    """
    pos = targets.to(torch.bool)
    ranked = pos.any(dim=1) & (~pos).any(dim=1)
    neg_logits = logits.masked_fill(pos, float("-inf"))
    pos_logits = (-logits).masked_fill(~pos, float("-inf"))
    # Rows without both kinds would give LSE(-inf...) and NaN gradients: neutralise them.
    neg_logits = torch.where(ranked[:, None], neg_logits, torch.zeros_like(logits))
    pos_logits = torch.where(ranked[:, None], pos_logits, torch.zeros_like(logits))
    z = torch.logsumexp(neg_logits, dim=1) + torch.logsumexp(pos_logits, dim=1)
    per_sample = torch.where(ranked, F.softplus(z), torch.zeros_like(z))
    return per_sample.mean()


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Multi-label binary cross-entropy on logits (multi-hot targets [B, C])."""
    return F.binary_cross_entropy_with_logits(logits, targets.to(logits.dtype))


def ce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Single-label cross-entropy: targets are class indices [B] or one-hot/probabilities [B, C]."""
    if targets.ndim == logits.ndim:
        return F.cross_entropy(logits, targets.to(logits.dtype))
    return F.cross_entropy(logits, targets.to(torch.long))


def classification_loss(logits: Tensor, targets: Tensor, kind: str = "lsep") -> Tensor:
    """The AudioFormer fine-tuning loss by name: "lsep", "bce" or "ce"."""
    if kind == "lsep":
        return lsep_loss(logits, targets)
    if kind == "bce":
        return bce_loss(logits, targets)
    if kind == "ce":
        return ce_loss(logits, targets)
    raise ValueError(f"unknown classification loss {kind!r}; choose from {CLASSIFICATION_LOSSES}")


def mlm_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """Masked-LM cross-entropy over masked positions only (labels = ignore_index elsewhere).

    A batch without any masked token returns 0 (not NaN) so a short clip cannot poison a step.
    """
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1).to(torch.long)
    summed = F.cross_entropy(flat_logits, flat_labels, ignore_index=ignore_index, reduction="sum")
    count = (flat_labels != ignore_index).sum().clamp_min(1)
    return summed / count


def mpc_loss(views: Tensor, temperature: float = 0.05, clip_ids: Tensor | None = None) -> Tensor:
    """Multi-positive contrastive loss over codebook views, exactly AudioFormer eq 8.

    `views` [B, V, D]: view 0 of clip b is the anchor (trainable C1 model), views 1..V-1 are
    the other codebooks of the same clip (frozen models; the caller detaches them). With
    cosine similarity s, per anchor b (the paper's Delta):

        l_b = log(1 + sum_{a != b} sum_{c=1..V} e^{s(b_1, a_c)/tau}
                        * sum_{c=2..V} e^{-s(b_1, b_c)/tau})
        L   = mean over b of l_b

    The self-pair s(b_1, b_1) is in neither sum. The product of sums factorises as
    exp(LSE_neg + LSE_pos), so l_b = softplus(LSE_{a != b, c} s/tau + LSE_{c >= 2} -s/tau):
    finite for any similarity and temperature. The loss tends to 0 when every view of a
    clip coincides and clips are far apart (eq 8's infimum; a SupCon-style softmax would
    floor at log(V - 1) instead).

    `clip_ids` [B] (optional) names each item's clip: the views of another item of the same
    clip (a clip drawn twice into one global batch) are the same audio, so they are left
    out of the anchor's negatives. An anchor without any negative has an empty sum: 0.
    """
    if views.ndim != 3 or views.shape[1] < 2:
        raise ValueError(f"views must be [B, V >= 2, D], got {tuple(views.shape)}")
    batch = views.shape[0]
    unit = F.normalize(views, dim=-1)
    # scaled[b, a, c] = s(b_1, a_c) / tau
    scaled = torch.einsum("bd,acd->bac", unit[:, 0], unit) / temperature
    rows = torch.arange(batch, device=views.device)
    negative_clip = rows[:, None] != rows[None, :]
    if clip_ids is not None:
        if clip_ids.shape != (batch,):
            raise ValueError(f"clip_ids must have shape ({batch},), got {tuple(clip_ids.shape)}")
        clip_ids = clip_ids.to(views.device)
        negative_clip &= clip_ids[:, None] != clip_ids[None, :]
    has_negative = negative_clip.any(dim=1)
    negatives = scaled.masked_fill(~negative_clip[:, :, None], float("-inf")).flatten(1)
    # Anchors without negatives would give LSE(-inf...) and NaN gradients: neutralise them.
    negatives = torch.where(has_negative[:, None], negatives, torch.zeros_like(negatives))
    positives = -scaled[rows, rows, 1:]
    z = torch.logsumexp(negatives, dim=1) + torch.logsumexp(positives, dim=1)
    per_anchor = torch.where(has_negative, F.softplus(z), torch.zeros_like(z))
    return per_anchor.mean()


def ft2_loss(
    logits: Tensor,
    targets: Tensor,
    views: Tensor,
    alpha: float = 0.95,
    temperature: float = 0.05,
    classification: str = "lsep",
    clip_ids: Tensor | None = None,
) -> Tensor:
    """AudioFormer FT2 multi-task loss: alpha * MLC + (1 - alpha) * MPC, alpha = 0.95."""
    mlc = classification_loss(logits, targets, classification)
    return alpha * mlc + (1.0 - alpha) * mpc_loss(views, temperature, clip_ids)

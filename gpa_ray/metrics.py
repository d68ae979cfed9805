"""Retrieval metrics (R@k, mAP@10, MRR with several captions per clip) and classification mAP.

Protocol (DP baseline and successors): captions are stored clip-major, clip i owning
captions i*n_caps .. (i+1)*n_caps - 1 (5 per clip in AudioCaps/Clotho). An explicit
`caption_to_clip` [n_captions] index covers any other layout.

- T2A: every caption queries the unique clips. R@k = fraction with rank <= k;
  mAP@10 = mean(1/rank if rank <= 10 else 0); MRR = mean(1/rank).
- A2T: every clip (with at least one caption) queries all captions. R@k = fraction whose
  best-ranked caption is within k; mAP@10 = mean over clips of
  (sum over its captions ranked <= 10 of precision at that rank) / (its number of captions);
  MRR = mean of 1/rank of its first relevant caption.

Ties count against the query (pessimistic ranking): a non-relevant item with a score equal
to a relevant one is ranked before it, so the rank of a relevant item with score s is
1 + #{non-relevant items with score >= s} + #{relevant items ranked above it}. A constant
scorer therefore gets the worst possible ranks, never perfect ones. Relevant items of equal
score are ordered among themselves arbitrarily, which changes none of the metrics.

Scores are consumed in blocks of `block_size` query rows, from a tensor or from a callable
`score_block(query_slice) -> Tensor[len(slice), n_items]`, so a 5k x 25k pool never has to
be held (or even computed) at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

ScoreSource = Tensor | Callable[[slice], Tensor]
DEFAULT_KS = (1, 5, 10)
MAP_CUTOFF = 10


def clip_major_caption_to_clip(n_clips: int, n_caps: int = 5) -> Tensor:
    """caption_to_clip for clip-major storage: [0]*n_caps + [1]*n_caps + ... ."""
    return torch.arange(n_clips).repeat_interleave(n_caps)


def _as_index(caption_to_clip: Tensor | Sequence[int]) -> Tensor:
    index = torch.as_tensor(caption_to_clip, dtype=torch.long).reshape(-1)
    if index.numel() and int(index.min()) < 0:
        raise ValueError("caption_to_clip holds a negative clip index")
    return index


def _blocks(scores: ScoreSource, n_queries: int, block_size: int) -> Iterator[tuple[slice, Tensor]]:
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    for start in range(0, n_queries, block_size):
        rows = slice(start, min(start + block_size, n_queries))
        block = scores[rows] if isinstance(scores, Tensor) else scores(rows)
        if block.shape[0] != rows.stop - rows.start:
            raise ValueError(
                f"score block for queries {rows.start}:{rows.stop} has {block.shape[0]} rows"
            )
        yield rows, block


def text_to_audio_ranks(
    scores: ScoreSource, caption_to_clip: Tensor | Sequence[int], block_size: int = 1024
) -> Tensor:
    """Rank (1 = best, pessimistic ties) of each caption's clip. scores: [n_captions, n_clips]."""
    target = _as_index(caption_to_clip)
    ranks = torch.empty(target.shape[0], dtype=torch.long)
    for rows, block in _blocks(scores, target.shape[0], block_size):
        block_target = target[rows].to(block.device)
        relevant = block.gather(1, block_target[:, None])
        # #{clips with score >= relevant} counts the relevant clip itself once: that is the
        # "1 +" of the rank, and every tie with another clip counts against the query.
        ranks[rows] = (block >= relevant).sum(dim=1).cpu()
    return ranks


def _clip_captions(target: Tensor, n_clips: int) -> tuple[Tensor, Tensor]:
    """[n_clips, max_caps] caption indices per clip (padded with 0) and the validity mask."""
    counts = torch.bincount(target, minlength=n_clips)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort(target, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(target.shape[0]) - starts[target[order]]
    index = torch.zeros(n_clips, width, dtype=torch.long)
    index[target[order], slot] = order
    valid = torch.arange(width)[None, :] < counts[:, None]
    return index, valid


def audio_to_text_ranks(
    scores: ScoreSource,
    caption_to_clip: Tensor | Sequence[int],
    n_clips: int | None = None,
    block_size: int = 1024,
) -> tuple[Tensor, Tensor]:
    """Ranks of each clip's relevant captions, best first. scores: [n_clips, n_captions].

    Returns (ranks [n_clips, max_caps], valid [n_clips, max_caps]): row c holds the ranks of
    clip c's captions in increasing order; entries past its caption count are invalid (0).
    The k-th best relevant caption with score s has rank k + #{non-relevant, score >= s}.
    """
    target = _as_index(caption_to_clip)
    if n_clips is None:
        if isinstance(scores, Tensor):
            n_clips = scores.shape[0]
        else:
            n_clips = int(target.max()) + 1 if target.numel() else 0
    index, valid = _clip_captions(target, n_clips)
    ranks = torch.zeros(n_clips, index.shape[1], dtype=torch.long)
    for rows, block in _blocks(scores, n_clips, block_size):
        if block.shape[1] != target.shape[0]:
            raise ValueError(
                f"score rows have {block.shape[1]} captions, caption_to_clip has {target.shape[0]}"
            )
        block_index = index[rows].to(block.device)
        block_valid = valid[rows].to(block.device)
        clip_ids = torch.arange(rows.start, rows.stop, device=block.device)
        relevant_mask = target.to(block.device)[None, :] == clip_ids[:, None]
        rel_scores = block.gather(1, block_index)
        rel_scores = rel_scores.masked_fill(~block_valid, float("-inf"))
        rel_sorted = torch.sort(rel_scores, dim=1, descending=True).values
        rank_block = torch.zeros_like(block_index)
        for k in range(index.shape[1]):
            above = (block >= rel_sorted[:, k : k + 1]) & ~relevant_mask
            rank_block[:, k] = above.sum(dim=1) + k + 1
        # Valid entries sort before the -inf padding, so the mask stays left-aligned.
        ranks[rows] = rank_block.masked_fill(~block_valid, 0).cpu()
    return ranks, valid


def _recall_and_rr(first_rank: Tensor, prefix: str, ks: Sequence[int]) -> dict[str, float]:
    ranks = first_rank.double()
    out = {f"{prefix}_R@{k}": float((ranks <= k).double().mean()) for k in ks}
    out[f"{prefix}_MRR"] = float((1.0 / ranks).mean())
    return out


def text_to_audio_metrics(
    scores: ScoreSource,
    caption_to_clip: Tensor | Sequence[int],
    block_size: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
    cutoff: int = MAP_CUTOFF,
) -> dict[str, float]:
    """T2A metrics from caption-query rows [n_captions, n_clips]: R@k, mAP@cutoff, MRR."""
    ranks = text_to_audio_ranks(scores, caption_to_clip, block_size)
    if ranks.numel() == 0:
        raise ValueError("no caption queries")
    out = _recall_and_rr(ranks, "t2a", ks)
    reciprocal = torch.where(ranks <= cutoff, 1.0 / ranks.double(), torch.zeros(()).double())
    out[f"t2a_mAP@{cutoff}"] = float(reciprocal.mean())
    return out


def audio_to_text_metrics(
    scores: ScoreSource,
    caption_to_clip: Tensor | Sequence[int],
    n_clips: int | None = None,
    block_size: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
    cutoff: int = MAP_CUTOFF,
) -> dict[str, float]:
    """A2T metrics from clip-query rows [n_clips, n_captions]: R@k, mAP@cutoff, MRR.

    Clips without any caption are not queries (they have nothing to retrieve).
    """
    ranks, valid = audio_to_text_ranks(scores, caption_to_clip, n_clips, block_size)
    has_caption = valid[:, 0]
    ranks, valid = ranks[has_caption], valid[has_caption]
    if ranks.shape[0] == 0:
        raise ValueError("no clip has a caption")
    out = _recall_and_rr(ranks[:, 0], "a2t", ks)
    position = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)[None, :]
    counted = valid & (ranks <= cutoff)
    precision = torch.where(counted, position / ranks.clamp_min(1).double(), 0.0)
    average_precision = precision.sum(dim=1) / valid.sum(dim=1).double()
    out[f"a2t_mAP@{cutoff}"] = float(average_precision.mean())
    return out


def retrieval_metrics(
    scores: Tensor,
    caption_to_clip: Tensor | Sequence[int] | None = None,
    n_caps: int = 5,
    text_bias: Tensor | None = None,
    block_size: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
    cutoff: int = MAP_CUTOFF,
) -> dict[str, float]:
    """Both directions from one audio x text score matrix [n_clips, n_captions].

    Without `caption_to_clip` the captions are clip-major with `n_caps` per clip.
    `text_bias` [n_captions] (e.g. Sinkhorn potentials g) is added for A2T only, as in GPA.
    """
    n_clips, n_captions = scores.shape
    if caption_to_clip is None:
        if n_captions != n_clips * n_caps:
            raise ValueError(
                f"{n_captions} captions is not {n_caps} per clip for {n_clips} clips; "
                "pass caption_to_clip"
            )
        caption_to_clip = clip_major_caption_to_clip(n_clips, n_caps)
    out = text_to_audio_metrics(scores.T, caption_to_clip, block_size, ks, cutoff)
    a2t_scores = scores if text_bias is None else scores + text_bias.to(scores)[None, :]
    out.update(audio_to_text_metrics(a2t_scores, caption_to_clip, n_clips, block_size, ks, cutoff))
    return out


def average_precision_per_class(scores: Tensor, targets: Tensor) -> Tensor:
    """AP of every class column: (1/n_pos) * sum over positives of precision at their rank.

    Ranks follow the same pessimistic tie rule as retrieval (negatives of equal score first).
    Classes without positives get NaN. scores, targets: [N, C].
    """
    labels = targets.to(torch.bool)
    # Two stable sorts: by label (negatives first), then by score descending; equal scores
    # keep the negatives-first order.
    by_label = torch.argsort(labels.to(torch.int8), dim=0, stable=True)
    scores_by_label = scores.gather(0, by_label)
    by_score = torch.argsort(scores_by_label, dim=0, descending=True, stable=True)
    order = by_label.gather(0, by_score)
    ranked = labels.gather(0, order).double()
    hits = torch.cumsum(ranked, dim=0)
    position = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64)[:, None]
    precision_sum = (hits / position * ranked).sum(dim=0)
    n_pos = ranked.sum(dim=0)
    return torch.where(n_pos > 0, precision_sum / n_pos.clamp_min(1), float("nan"))


def mean_average_precision(scores: Tensor, targets: Tensor) -> float:
    """Macro mAP: AP per class averaged over classes with at least one positive."""
    ap = average_precision_per_class(scores, targets)
    present = ~torch.isnan(ap)
    if not bool(present.any()):
        raise ValueError("no class has a positive example")
    return float(ap[present].mean())


def accuracy(scores: Tensor, labels: Tensor) -> float:
    """Top-1 accuracy for single-label data (labels are class indices [N])."""
    return float((scores.argmax(dim=1).cpu() == labels.cpu()).double().mean())


def classification_metrics(scores: Tensor, targets: Tensor) -> dict[str, float]:
    """{"mAP"} for multi-hot targets [N, C]; {"accuracy", "mAP"} for class indices [N]."""
    scores = scores.detach().float().cpu()
    targets = targets.detach().cpu()
    if targets.ndim == 1:
        one_hot = torch.nn.functional.one_hot(targets.long(), scores.shape[1])
        return {
            "accuracy": accuracy(scores, targets),
            "mAP": mean_average_precision(scores, one_hot),
        }
    return {"mAP": mean_average_precision(scores, targets)}

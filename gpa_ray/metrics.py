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

Relevance: a caption is relevant to its own clip. Given the caption texts
(`caption_texts`, or stable int keys of them that are equal exactly for identical texts),
a caption whose text is identical to one of a clip's own captions is relevant to that clip
too, in both directions: in a pool of templated captions (ESC-50: every clip of a class
carries the same sentence) the other clips' copies of the sentence are right answers, not
wrong ones, and a T2A query with that sentence is answered by every clip that carries it.
With several relevant items T2A's mAP@10 is A2T's average precision (it is 1/rank with
one). Distinct captions (AudioCaps, Clotho) change nothing.

Ties (`ties`): "mid" (default) is the expected rank under random tie-breaking. In a group
of g items of equal score s, r of them relevant, after P items scored above s, the j-th
relevant item of the group has expected rank P + j (g + 1) / (r + 1); with one relevant
item that is the group's mid-rank P + (g + 1) / 2. "pessimistic" ranks every tied
non-relevant item first: P + (g - r) + j, so a constant scorer gets the worst ranks. On
scores without ties both equal the DP baseline's argsort ranks, hence its numbers.

Scores are consumed in blocks of `block_size` query rows, from a tensor or from a callable
`score_block(query_slice) -> Tensor[len(slice), n_items]`, so a 5k x 25k pool never has to
be held (or even computed) at once.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor

ScoreSource = Tensor | Callable[[slice], Tensor]
DEFAULT_KS = (1, 5, 10)
MAP_CUTOFF = 10
TIE_RULES = ("mid", "pessimistic")


def clip_major_caption_to_clip(n_clips: int, n_caps: int = 5) -> Tensor:
    """caption_to_clip for clip-major storage: [0]*n_caps + [1]*n_caps + ... ."""
    return torch.arange(n_clips).repeat_interleave(n_caps)


def _as_index(caption_to_clip: Tensor | Sequence[int]) -> Tensor:
    index = torch.as_tensor(caption_to_clip, dtype=torch.long).reshape(-1)
    if index.numel() and int(index.min()) < 0:
        raise ValueError("caption_to_clip holds a negative clip index")
    return index


def _check_ties(ties: str) -> None:
    if ties not in TIE_RULES:
        raise ValueError(f"unknown tie rule {ties!r}; choose one of {TIE_RULES}")


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


@dataclasses.dataclass(frozen=True)
class Relevance:
    """The relevant items of every query: `index` [n_queries, width] item indices, padded
    with 0 where `valid` [n_queries, width] is False (valid entries first, no repeats)."""

    index: Tensor
    valid: Tensor
    n_items: int | None = None

    @classmethod
    def from_lists(cls, rows: Sequence[Sequence[int]], n_items: int | None) -> Relevance:
        lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
        width = max(int(lengths.max()) if len(rows) else 0, 1)
        flat = torch.tensor([item for r in rows for item in r], dtype=torch.long)
        query = torch.repeat_interleave(torch.arange(len(rows)), lengths)
        slot = torch.arange(flat.shape[0]) - torch.repeat_interleave(
            torch.cumsum(lengths, 0) - lengths, lengths
        )
        index = torch.zeros(len(rows), width, dtype=torch.long)
        index[query, slot] = flat
        valid = torch.arange(width)[None, :] < lengths[:, None]
        return cls(index, valid, n_items)


def _clip_captions(target: Tensor, n_clips: int) -> Relevance:
    """Each clip's own captions (A2T relevance by ownership only)."""
    counts = torch.bincount(target, minlength=n_clips)
    width = max(int(counts.max()) if counts.numel() else 0, 1)
    order = torch.argsort(target, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(target.shape[0]) - starts[target[order]]
    index = torch.zeros(n_clips, width, dtype=torch.long)
    index[target[order], slot] = order
    valid = torch.arange(width)[None, :] < counts[:, None]
    return Relevance(index, valid, target.shape[0])


def _text_groups(
    target: Tensor, texts: Sequence[str] | Sequence[int]
) -> tuple[list[int], dict[int, set[int]]]:
    """(group of each caption: one per distinct text, clips owning each group)."""
    if len(texts) != target.shape[0]:
        raise ValueError(
            f"{len(texts)} caption texts for {target.shape[0]} captions in caption_to_clip"
        )
    group_of: dict[str | int, int] = {}
    groups = [group_of.setdefault(text, len(group_of)) for text in texts]
    owners: dict[int, set[int]] = {}
    for group, clip in zip(groups, target.tolist(), strict=True):
        owners.setdefault(group, set()).add(clip)
    return groups, owners


def a2t_relevance(
    target: Tensor, n_clips: int, caption_texts: Sequence[str] | Sequence[int] | None = None
) -> Relevance:
    """Captions relevant to each clip: its own, plus (with texts) every caption whose text
    equals one of its own."""
    if caption_texts is None:
        return _clip_captions(target, n_clips)
    groups, owners = _text_groups(target, caption_texts)
    rows: list[list[int]] = [[] for _ in range(n_clips)]
    for caption, group in enumerate(groups):
        for clip in owners[group]:
            if clip < n_clips:
                rows[clip].append(caption)
    return Relevance.from_lists(rows, target.shape[0])


def t2a_relevance(
    target: Tensor,
    n_clips: int | None = None,
    caption_texts: Sequence[str] | Sequence[int] | None = None,
) -> Relevance:
    """Clips relevant to each caption: its own, plus (with texts) every clip that owns a
    caption of the same text."""
    if caption_texts is None:
        own = torch.ones(target.shape[0], 1, dtype=torch.bool)
        return Relevance(target[:, None].clone(), own, n_clips)
    groups, owners = _text_groups(target, caption_texts)
    return Relevance.from_lists([sorted(owners[g]) for g in groups], n_clips)


def _block_ranks(block: Tensor, index: Tensor, valid: Tensor, ties: str) -> Tensor:
    """Expected (or pessimistic) ranks [rows, width] of each row's relevant items, best
    first; 0 where invalid. See the module docstring for the two rules."""
    rel = block.gather(1, index).masked_fill(~valid, float("-inf"))
    rel_sorted = torch.sort(rel, dim=1, descending=True).values
    # Valid entries sort before the -inf padding, so the sorted mask stays left-aligned.
    sorted_valid = torch.arange(index.shape[1], device=block.device)[None, :] < valid.sum(
        dim=1, keepdim=True
    )
    ranks = torch.zeros(index.shape, dtype=torch.float64, device=block.device)
    for k in range(index.shape[1]):
        s = rel_sorted[:, k : k + 1]
        above = (block > s).sum(dim=1)
        tied = (block == s).sum(dim=1)
        rel_above = ((rel_sorted > s) & sorted_valid).sum(dim=1)
        rel_tied = ((rel_sorted == s) & sorted_valid).sum(dim=1)
        j = (k + 1 - rel_above).double()
        if ties == "mid":
            ranks[:, k] = above + j * (tied + 1).double() / (rel_tied + 1).double()
        else:
            ranks[:, k] = (above + tied - rel_tied).double() + j
    return ranks.masked_fill(~sorted_valid, 0.0)


def relevant_ranks(
    scores: ScoreSource,
    relevance: Relevance,
    block_size: int = 1024,
    ties: str = "mid",
) -> tuple[Tensor, Tensor]:
    """(ranks [n_queries, width] float64, valid) of every query's relevant items, best
    first, from query rows [n_queries, n_items] read block by block."""
    _check_ties(ties)
    n_queries = relevance.index.shape[0]
    ranks = torch.zeros(relevance.index.shape, dtype=torch.float64)
    for rows, block in _blocks(scores, n_queries, block_size):
        if relevance.n_items is not None and block.shape[1] != relevance.n_items:
            raise ValueError(
                f"score rows have {block.shape[1]} columns, caption_to_clip implies "
                f"{relevance.n_items}"
            )
        index = relevance.index[rows].to(block.device)
        row_valid = relevance.valid[rows].to(block.device)
        # Every relevant item scans its row twice (> and ==): contiguous rows (a T2A block
        # of R.T is a strided view) make each scan one pass over memory.
        ranks[rows] = _block_ranks(block.contiguous(), index, row_valid, ties).cpu()
    return ranks, relevance.valid.clone()


def text_to_audio_ranks(
    scores: ScoreSource,
    caption_to_clip: Tensor | Sequence[int],
    block_size: int = 1024,
    ties: str = "mid",
    caption_texts: Sequence[str] | Sequence[int] | None = None,
) -> Tensor:
    """Rank (1 = best, float64) of each caption's best-ranked relevant clip.
    scores: [n_captions, n_clips]."""
    return _t2a_ranks(scores, caption_to_clip, block_size, ties, caption_texts)[0][:, 0]


def _t2a_ranks(
    scores: ScoreSource,
    caption_to_clip: Tensor | Sequence[int],
    block_size: int,
    ties: str,
    caption_texts: Sequence[str] | Sequence[int] | None,
) -> tuple[Tensor, Tensor]:
    target = _as_index(caption_to_clip)
    n_clips = scores.shape[1] if isinstance(scores, Tensor) else None
    return relevant_ranks(scores, t2a_relevance(target, n_clips, caption_texts), block_size, ties)


def audio_to_text_ranks(
    scores: ScoreSource,
    caption_to_clip: Tensor | Sequence[int],
    n_clips: int | None = None,
    block_size: int = 1024,
    ties: str = "mid",
    caption_texts: Sequence[str] | Sequence[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Ranks of each clip's relevant captions, best first. scores: [n_clips, n_captions].

    Returns (ranks [n_clips, width] float64, valid [n_clips, width]): row c holds the ranks
    of clip c's relevant captions in increasing order; entries past their count are invalid
    (0). Clips without a relevant caption have no valid entry.
    """
    target = _as_index(caption_to_clip)
    if n_clips is None:
        if isinstance(scores, Tensor):
            n_clips = scores.shape[0]
        else:
            n_clips = int(target.max()) + 1 if target.numel() else 0
    relevance = a2t_relevance(target, n_clips, caption_texts)
    return relevant_ranks(scores, relevance, block_size, ties)


def per_query_metrics(
    ranks: Tensor, valid: Tensor, ks: Sequence[int] = DEFAULT_KS, cutoff: int = MAP_CUTOFF
) -> dict[str, Tensor]:
    """Each query's R@k (0/1) and reciprocal rank of its first relevant rank, and its
    average precision at `cutoff`: (sum over relevant items ranked <= cutoff of precision
    there) / (number relevant). Every metric of this module is the mean of these over the
    queries; kept per query so that paired comparisons (bootstraps) can resample queries.
    `ranks`, `valid` [n_queries, width] as `relevant_ranks` returns them (each query with
    at least one valid entry)."""
    first = ranks[:, 0]
    out = {f"R@{k}": (first <= k).double() for k in ks}
    out["MRR"] = 1.0 / first
    position = torch.arange(1, ranks.shape[1] + 1, dtype=torch.float64)[None, :]
    counted = valid & (ranks <= cutoff)
    precision = torch.where(counted, position / ranks.clamp_min(1.0), 0.0)
    out[f"mAP@{cutoff}"] = precision.sum(dim=1) / valid.sum(dim=1).double()
    return out


def _ranked_metrics(
    ranks: Tensor, valid: Tensor, prefix: str, ks: Sequence[int], cutoff: int
) -> dict[str, float]:
    """The means over queries of `per_query_metrics`, named `<prefix>_<metric>`."""
    return {
        f"{prefix}_{name}": float(values.mean())
        for name, values in per_query_metrics(ranks, valid, ks, cutoff).items()
    }


def text_to_audio_metrics(
    scores: ScoreSource,
    caption_to_clip: Tensor | Sequence[int],
    block_size: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
    cutoff: int = MAP_CUTOFF,
    ties: str = "mid",
    caption_texts: Sequence[str] | Sequence[int] | None = None,
) -> dict[str, float]:
    """T2A metrics from caption-query rows [n_captions, n_clips]: R@k, mAP@cutoff, MRR."""
    ranks, valid = _t2a_ranks(scores, caption_to_clip, block_size, ties, caption_texts)
    if ranks.shape[0] == 0:
        raise ValueError("no caption queries")
    return _ranked_metrics(ranks, valid, "t2a", ks, cutoff)


def audio_to_text_metrics(
    scores: ScoreSource,
    caption_to_clip: Tensor | Sequence[int],
    n_clips: int | None = None,
    block_size: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
    cutoff: int = MAP_CUTOFF,
    ties: str = "mid",
    caption_texts: Sequence[str] | Sequence[int] | None = None,
) -> dict[str, float]:
    """A2T metrics from clip-query rows [n_clips, n_captions]: R@k, mAP@cutoff, MRR.

    Clips without any caption are not queries (they have nothing to retrieve).
    """
    ranks, valid = audio_to_text_ranks(
        scores, caption_to_clip, n_clips, block_size, ties, caption_texts
    )
    has_caption = valid[:, 0]
    if not bool(has_caption.any()):
        raise ValueError("no clip has a caption")
    return _ranked_metrics(ranks[has_caption], valid[has_caption], "a2t", ks, cutoff)


def retrieval_metrics(
    scores: Tensor,
    caption_to_clip: Tensor | Sequence[int] | None = None,
    n_caps: int = 5,
    text_bias: Tensor | None = None,
    block_size: int = 1024,
    ks: Sequence[int] = DEFAULT_KS,
    cutoff: int = MAP_CUTOFF,
    ties: str = "mid",
    caption_texts: Sequence[str] | Sequence[int] | None = None,
) -> dict[str, float]:
    """Both directions from one audio x text score matrix [n_clips, n_captions].

    Without `caption_to_clip` the captions are clip-major with `n_caps` per clip.
    `text_bias` [n_captions] (e.g. Sinkhorn potentials g) is added for A2T only, as in GPA.
    `ties` and `caption_texts`: see the module docstring.
    """
    n_clips, n_captions = scores.shape
    if caption_to_clip is None:
        if n_captions != n_clips * n_caps:
            raise ValueError(
                f"{n_captions} captions is not {n_caps} per clip for {n_clips} clips; "
                "pass caption_to_clip"
            )
        caption_to_clip = clip_major_caption_to_clip(n_clips, n_caps)
    options = {"ties": ties, "caption_texts": caption_texts}
    out = text_to_audio_metrics(scores.T, caption_to_clip, block_size, ks, cutoff, **options)
    a2t_scores = scores if text_bias is None else scores + text_bias.to(scores)[None, :]
    out.update(
        audio_to_text_metrics(
            a2t_scores, caption_to_clip, n_clips, block_size, ks, cutoff, **options
        )
    )
    return out


def average_precision_per_class(scores: Tensor, targets: Tensor) -> Tensor:
    """AP of every class column: (1/n_pos) * sum over positives of precision at their rank.

    Ties are ranked pessimistically (negatives of equal score first; retrieval's
    `ties="pessimistic"`).
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
